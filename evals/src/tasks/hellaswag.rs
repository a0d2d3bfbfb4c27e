//! HellaSwag: pick the ending a model finds most likely. Reports `acc` (sum of the ending's
//! token log-probabilities) and `acc_norm` (that sum divided by the ending's length in UTF-8
//! bytes). Chance is 25%.
//!
//! Reads the validation file as shipped (`hellaswag_val_full.txt.bz2`, llama.cpp layout):
//! six lines an item, `activity_label: context`, the correct index, then the four endings.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{EvalError, Scorer, Task, TaskResult};

pub const DEFAULT_PATH: &str = "hellaswag/hellaswag_val_full.txt.bz2";

#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub context: String,
    pub label: usize,
    pub endings: [String; 4],
}

/// Parses the six-line layout. A malformed item is an error naming its line.
pub fn parse(text: &str, source: &str) -> Result<Vec<Item>, EvalError> {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() % 6 != 0 {
        return Err(EvalError::Data(format!("{source}: {} lines, not a multiple of 6 (six lines an item)", lines.len())));
    }
    lines
        .chunks(6)
        .enumerate()
        .map(|(i, c)| {
            let label: usize = c[1].trim().parse().ok().filter(|&l| l < 4).ok_or_else(|| {
                EvalError::Data(format!("{source}:{}: expected the correct index 0-3, got '{}'", i * 6 + 2, c[1]))
            })?;
            Ok(Item {
                context: c[0].to_string(),
                label,
                endings: [c[2].to_string(), c[3].to_string(), c[4].to_string(), c[5].to_string()],
            })
        })
        .collect()
}

/// Reads the file, decompressing `.bz2`.
pub fn load(path: &Path) -> Result<Vec<Item>, EvalError> {
    let raw = std::fs::read(path).map_err(|e| EvalError::Data(format!("{}: {e}", path.display())))?;
    let text = if path.extension().is_some_and(|e| e == "bz2") {
        let mut s = String::new();
        bzip2::read::BzDecoder::new(&raw[..])
            .read_to_string(&mut s)
            .map_err(|e| EvalError::Data(format!("{}: not a readable bz2 text file: {e}", path.display())))?;
        s
    } else {
        String::from_utf8(raw).map_err(|e| EvalError::Data(format!("{}: {e}", path.display())))?
    };
    parse(&text, &path.display().to_string())
}

/// (sum of log-probabilities, ending length in bytes) for each of an item's endings.
pub fn score_item(lm: &mut dyn Scorer, item: &Item) -> Result<Vec<(f64, usize)>, EvalError> {
    let tok = lm.tokenizer();
    let mut ctx = vec![tok.bos_id];
    ctx.extend(tok.encode(&item.context).map_err(|e| EvalError::Data(e.to_string()))?);
    let mut seqs = Vec::with_capacity(4);
    let mut lens = Vec::with_capacity(4);
    for e in &item.endings {
        let cont_text = format!(" {e}");
        let cont = lm.tokenizer().encode(&cont_text).map_err(|e| EvalError::Data(e.to_string()))?;
        let mut s = ctx.clone();
        s.extend(&cont);
        // Keep the ending whole: drop context from the left if the pair is too long.
        let keep = (lm.context() + 1).min(s.len());
        let s = s[s.len() - keep..].to_vec();
        lens.push((cont.len().min(keep - 1), e.len()));
        seqs.push(s);
    }
    let lps = lm.logprobs(&seqs);
    Ok(lps
        .iter()
        .zip(&lens)
        .map(|(lp, &(n, bytes))| (lp[lp.len() - n..].iter().sum(), bytes + 1))
        .collect())
}

pub struct HellaSwag {
    pub path: PathBuf,
    pub limit: Option<usize>,
}

impl HellaSwag {
    pub fn new(path: PathBuf, limit: Option<usize>) -> Self {
        Self { path, limit }
    }
}

fn argmax(v: impl Iterator<Item = f64>) -> usize {
    v.enumerate().fold((0, f64::NEG_INFINITY), |b, (i, x)| if x > b.1 { (i, x) } else { b }).0
}

/// Scores `items`, returning (acc, acc_norm) and per-item predictions.
pub fn evaluate(lm: &mut dyn Scorer, items: &[Item]) -> Result<(f64, f64, Vec<(usize, usize)>), EvalError> {
    let (mut acc, mut acc_norm) = (0usize, 0usize);
    let mut preds = Vec::with_capacity(items.len());
    for it in items {
        let s = score_item(lm, it)?;
        let p = argmax(s.iter().map(|x| x.0));
        let pn = argmax(s.iter().map(|x| x.0 / x.1 as f64));
        acc += (p == it.label) as usize;
        acc_norm += (pn == it.label) as usize;
        preds.push((p, pn));
    }
    let n = items.len().max(1) as f64;
    Ok((acc as f64 / n, acc_norm as f64 / n, preds))
}

impl Task for HellaSwag {
    fn files(&self) -> Vec<&std::path::Path> {
        vec![self.path.as_path()]
    }
    fn name(&self) -> String {
        "hellaswag".into()
    }
    fn run(&self, lm: &mut dyn Scorer) -> Result<TaskResult, EvalError> {
        let mut items = load(&self.path)?;
        if let Some(n) = self.limit {
            items.truncate(n);
        }
        let (acc, acc_norm, _) = evaluate(lm, &items)?;
        let mut r = TaskResult { n: items.len(), ..Default::default() };
        r.metrics.insert("acc".into(), acc);
        r.metrics.insert("acc_norm".into(), acc_norm);
        r.notes.push("chance is 25% (4 endings)".into());
        Ok(r)
    }
}
