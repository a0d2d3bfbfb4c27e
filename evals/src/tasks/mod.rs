//! The task registry: one file per task, and [`TASKS`] with [`parse_task`], the one place task
//! names are known (recipe validation, `kiln eval --task` and its help all come here).
//! Adding a task is a file here, a row in [`TASKS`] and an arm in [`parse_task`].

pub mod bpb;
pub mod chat;
pub mod gsm8k;
pub mod hellaswag;
pub mod samples;
pub mod squad;
pub mod squad_rag;
pub mod squad_rc;
pub mod squad_retrieval;

use crate::{EvalError, Task};

/// A task's name, its spec syntax and what it measures.
pub struct TaskInfo {
    pub name: &'static str,
    pub usage: &'static str,
    pub about: &'static str,
}

/// Every task a recipe's `[eval]` or `kiln eval --task` may name.
pub const TASKS: &[TaskInfo] = &[
    TaskInfo { name: "bpb", usage: "bpb:FILE[@FROM]", about: "bits per UTF-8 byte of a text or JSONL file under the data root (@0.9: its last 10%)" },
    TaskInfo { name: "hellaswag", usage: "hellaswag[:N|all]", about: "HellaSwag validation accuracy (acc, acc_norm) on the first N items" },
    TaskInfo { name: "squad", usage: "squad[:N|all]", about: "SQuAD v1.1 closed-book exact match and F1 on the first N questions (default 200)" },
    TaskInfo { name: "squad-rc", usage: "squad-rc[:N|all[@ARTICLE]]", about: "SQuAD v1.1 reading comprehension, chat-formatted, passage given: EM, F1 and format on N questions (default 200) spread over the articles from ARTICLE on (default 0)" },
    TaskInfo { name: "squad-rag", usage: "squad-rag[:N|all[@ARTICLE]][:closed|gold|topK]", about: "SQuAD v1.1 open book, chat-formatted: EM, F1 and format on N questions (default 200) from ARTICLE on, with no passage, the gold passage, or the K best passages of the retrieval index (default top3; also recall@1/5/20, MRR and query latency)" },
    TaskInfo { name: "squad-retrieval", usage: "squad-retrieval[:N|all[@FROM[-TO]]][:held|all][:sweep]", about: "SQuAD v1.1 retrieval: recall@1/5/20 and MRR of N questions (default all) of articles FROM (default 38) to TO (default the last) finding their paragraph among those articles' paragraphs (or all), for the model's dense embeddings, BM25 and their hybrid; sweep also scores fusion weights 0.1 to 0.9" },
    TaskInfo { name: "gsm8k", usage: "gsm8k[:N]", about: "GSM8K test, chat-formatted, greedy: exact match of the reply's last number, and format, on the first N problems (default 100)" },
];

/// The specs, comma-separated: `bpb:FILE[@FROM], hellaswag[:N|all], squad[:N|all]`.
pub fn usage() -> String {
    TASKS.iter().map(|t| t.usage).collect::<Vec<_>>().join(", ")
}

/// Parses `name[:arg]`, as `kiln eval --task` and the recipe's `[eval]` take them:
/// `bpb:FILE[@FROM]`, `hellaswag[:N]`, `squad[:N]`. Relative files are under `data_root`.
pub fn parse_task(spec: &str, data_root: &std::path::Path) -> Result<Box<dyn Task>, EvalError> {
    let (name, arg) = match spec.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (spec, None),
    };
    let count = |default: Option<usize>| -> Result<Option<usize>, EvalError> {
        match arg {
            None => Ok(default),
            Some("all") => Ok(None),
            Some(a) => a.parse().map(Some).map_err(|_| EvalError::Spec {
                spec: spec.into(),
                message: format!("'{a}' is not a number of items"),
                hint: format!("{name}:500 scores the first 500 items, {name}:all every one"),
            }),
        }
    };
    Ok(match name {
        "bpb" => {
            let file = arg.ok_or_else(|| EvalError::Spec {
                spec: spec.into(),
                message: "bpb needs a file".into(),
                hint: "bpb:tinyshakespeare/input.txt (text or JSONL, under the data root)".into(),
            })?;
            let (file, from) = match file.rsplit_once('@') {
                Some((f, x)) => {
                    let from: f64 = x.parse().ok().filter(|v| (0.0..1.0).contains(v)).ok_or_else(|| EvalError::Spec {
                        spec: spec.into(),
                        message: format!("'@{x}' is not a fraction in [0, 1)"),
                        hint: "bpb:FILE@0.9 scores the last 10% of FILE (Kiln's validation split)".into(),
                    })?;
                    (f, from)
                }
                None => (file, 0.0),
            };
            let mut t = bpb::Bpb::new(data_root.join(file));
            t.from = from;
            Box::new(t)
        }
        "hellaswag" => Box::new(hellaswag::HellaSwag::new(data_root.join(hellaswag::DEFAULT_PATH), count(None)?)),
        "squad" => Box::new(squad::Squad::new(data_root.join(squad::DEFAULT_PATH), count(Some(200))?)),
        "squad-rc" => {
            let (n, from) = match arg.map(|a| a.split_once('@').unwrap_or((a, "0"))) {
                None => (None, "0"),
                Some((n, f)) => ((!n.is_empty()).then_some(n), f),
            };
            let bad = |what: &str| EvalError::Spec { spec: spec.into(), message: format!("'{what}' is not a number"), hint: "squad-rc:200@38 scores 200 questions of articles 38 and after".into() };
            let n = match n {
                Some("all") => usize::MAX,
                Some(x) => x.parse().map_err(|_| bad(x))?,
                None => 200,
            };
            let from_article = from.parse().map_err(|_| bad(from))?;
            Box::new(squad_rc::SquadRc { qa: data_root.join(squad_rc::QA), paragraphs: data_root.join(squad_rc::PARAGRAPHS), n, from_article, max_answer_tokens: 32 })
        }
        "squad-rag" => {
            let bad = |what: &str| EvalError::Spec { spec: spec.into(), message: format!("'{what}' is not understood"), hint: "squad-rag:200@38:top3 answers 200 questions of articles 38 on from the 3 best passages; :closed and :gold give the bounds".into() };
            let mut parts = arg.unwrap_or("").split(':');
            let count = parts.next().unwrap_or("");
            let mode = parts.next().unwrap_or("top3");
            if parts.next().is_some() {
                return Err(bad(arg.unwrap_or("")));
            }
            let (n, from) = count.split_once('@').unwrap_or((count, "0"));
            let n = match n {
                "" => 200,
                "all" => usize::MAX,
                x => x.parse().map_err(|_| bad(x))?,
            };
            let from_article = from.parse().map_err(|_| bad(from))?;
            let mode = squad_rag::SquadRag::parse_mode(mode).ok_or_else(|| bad(mode))?;
            Box::new(squad_rag::SquadRag { qa: data_root.join(squad_rc::QA), paragraphs: data_root.join(squad_rc::PARAGRAPHS), n, from_article, mode, index: None, budget: 1024, max_answer_tokens: 32 })
        }
        "squad-retrieval" => {
            let bad = |what: &str| EvalError::Spec { spec: spec.into(), message: format!("'{what}' is not understood"), hint: "squad-retrieval:all@38:held scores every question of articles 38 on among those articles' paragraphs".into() };
            let mut parts = arg.unwrap_or("").split(':');
            let count = parts.next().unwrap_or("");
            let (mut pool, mut sweep) = (None, false);
            for p in parts {
                match p {
                    "held" | "all" if pool.is_none() => pool = Some(p),
                    "sweep" if !sweep => sweep = true,
                    _ => return Err(bad(p)),
                }
            }
            let (n, range) = count.split_once('@').unwrap_or((count, "38"));
            let n = match n {
                "" | "all" => usize::MAX,
                x => x.parse().map_err(|_| bad(x))?,
            };
            let (from, to) = match range.split_once('-') {
                Some((f, t)) => (f, Some(t)),
                None => (range, None),
            };
            let from_article: usize = from.parse().map_err(|_| bad(from))?;
            let to_article = match to {
                Some(t) => t.parse().ok().filter(|&t| t > from_article).ok_or_else(|| bad(t))?,
                None => usize::MAX,
            };
            Box::new(squad_retrieval::SquadRetrieval {
                qa: data_root.join(squad_rc::QA),
                paragraphs: data_root.join(squad_rc::PARAGRAPHS),
                n,
                from_article,
                to_article,
                all_paragraphs: pool == Some("all"),
                fusion: kiln_retrieval::Fusion::default(),
                sweep,
            })
        }
        "gsm8k" => Box::new(gsm8k::Gsm8k { path: data_root.join(gsm8k::DEFAULT_PATH), n: count(Some(100))?.unwrap_or(usize::MAX), max_tokens: 320 }),
        other => {
            return Err(EvalError::Spec {
                spec: spec.into(),
                message: format!("unknown task '{other}'"),
                hint: format!("tasks: {}", usage()),
            })
        }
    })
}

