//! Supervised fine-tuning data: conversations rendered by the chat template, tokenized with
//! their loss masks, overlong examples dropped or truncated (and counted), then batches padded
//! to the longest example of each batch.

use anyhow::{bail, Context, Result};
use kiln_models::chat::{ChatTemplate, TrainOn};
use kiln_models::Tokenizer;
use kiln_recipes::{DataFormat, DataSection, Overlong};
use serde::{Deserialize, Serialize};

use super::conversations::{detect, Converter};
use super::loader::{Batch, Epochs, LoaderPos};
use super::packing::{best_fit_decreasing, packed_batch};
use super::records::{join_table, read_records, select_groups, Record};
use super::sources::Dirs;

/// One tokenized conversation: `ids[i + 1]` is predicted from `ids[..=i]`, and counts where
/// `loss_mask[i + 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl Example {
    pub fn loss_tokens(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// What became of the records, for the plan summary and the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SftStats {
    pub records: usize,
    pub examples: usize,
    pub dropped_overlong: usize,
    pub truncated: usize,
    /// Examples left with no token carrying loss (an empty reply, or one cut off entirely).
    pub dropped_no_loss: usize,
    pub tokens: usize,
    pub loss_tokens: usize,
    /// Tokens removed by truncation.
    pub truncated_tokens: usize,
    /// Training rows (examples, or packed rows of several).
    pub rows: usize,
    /// The share of the training batches' positions that are padding (over an epoch).
    pub padding_share: f64,
}

/// Everything SFT trains and validates on.
#[derive(Debug, Clone)]
pub struct SftData {
    pub train: Vec<Example>,
    pub val: Vec<Example>,
    pub stats: SftStats,
}

pub fn train_on(t: kiln_recipes::TrainOn) -> TrainOn {
    match t {
        kiln_recipes::TrainOn::Assistant => TrainOn::Assistant,
        kiln_recipes::TrainOn::LastAssistant => TrainOn::LastAssistant,
        kiln_recipes::TrainOn::All => TrainOn::All,
    }
}

/// The chat template the recipe names: the model's own (`"model"`), ChatML, or a `.jinja` file.
pub fn chat_template(data: &DataSection, tok: &Tokenizer, dirs: &Dirs) -> Result<ChatTemplate> {
    let source = match data.chat_template.as_str() {
        "model" => None,
        "chatml" => Some(kiln_models::chat::CHATML.to_string()),
        file => {
            let p = dirs.under_root(file, "data.chat_template")?;
            Some(std::fs::read_to_string(&p).with_context(|| format!("data.chat_template: reading {}\n  hint: \"model\", \"chatml\", or a .jinja file under the data root", p.display()))?)
        }
    };
    ChatTemplate::new(tok, source.as_deref()).context("data.chat_template")
}

/// Every source's records as conversations (groups selected, joins made; with `raft`, each
/// record's passages retrieved, distractors from the selected records' documents only).
pub fn conversations(data: &DataSection, files: &[std::path::PathBuf], dirs: &Dirs, mut raft: Option<&mut super::raft::Raft>) -> Result<Vec<Vec<kiln_models::chat::Message>>> {
    let join = match &data.join {
        Some(j) => Some(join_table(read_records(&dirs.under_root(j, "data.join")?)?, &data.join_key)?),
        None => None,
    };
    let mut sources = Vec::with_capacity(files.len());
    for path in files {
        let mut records: Vec<Record> = read_records(path)?;
        if let (Some(field), Some(range)) = (&data.group_by, data.groups) {
            records = select_groups(records, field, range).with_context(|| format!("{}", path.display()))?;
        }
        let Some(first) = records.first() else {
            bail!("{}: no records{}", path.display(), if data.group_by.is_some() { " in the selected groups" } else { "" });
        };
        let format = if data.format == DataFormat::Auto { detect(first)? } else { data.format };
        if let Some(r) = raft.as_deref_mut() {
            for rec in &records {
                r.allowed.insert(super::records::key_of(rec, &data.join_key).context("data.join_key")?);
            }
        }
        sources.push((records, format));
    }
    let mut out = Vec::new();
    let mut join = join;
    for (records, format) in &sources {
        let conv = Converter::new(*format, data, join.take(), raft.as_deref())?;
        for r in records {
            out.push(conv.convert(r)?);
        }
        join = conv.join;
    }
    Ok(out)
}

/// Renders, tokenizes and fits the conversations to `context` (+1: the last target), then holds
/// out the last `val_fraction` of the examples.
pub fn examples(convs: &[Vec<kiln_models::chat::Message>], chat: &ChatTemplate, tok: &Tokenizer, data: &DataSection, context: usize) -> Result<SftData> {
    let mut stats = SftStats { records: convs.len(), ..Default::default() };
    let mut all = Vec::with_capacity(convs.len());
    let on = train_on(data.train_on);
    for (i, c) in convs.iter().enumerate() {
        let ex = chat.encode(tok, c, on).with_context(|| format!("conversation {i}"))?;
        let (mut ids, mut mask) = (ex.ids, ex.loss_mask);
        if ids.len() > context + 1 {
            match data.overlong {
                Overlong::Drop => {
                    stats.dropped_overlong += 1;
                    continue;
                }
                Overlong::Truncate => {
                    stats.truncated += 1;
                    stats.truncated_tokens += ids.len() - (context + 1);
                    ids.truncate(context + 1);
                    mask.truncate(context + 1);
                }
            }
        }
        let e = Example { ids, loss_mask: mask };
        if e.loss_tokens() == 0 {
            stats.dropped_no_loss += 1;
            continue;
        }
        stats.tokens += e.ids.len();
        stats.loss_tokens += e.loss_tokens();
        all.push(e);
    }
    stats.examples = all.len();
    let n_val = ((all.len() as f64) * data.val_fraction).round() as usize;
    if all.len() < 2 || n_val == 0 || n_val == all.len() {
        bail!(
            "data: {} usable examples ({} records; {} too long, {} with no assistant tokens) cannot be split with val_fraction {}\n  hint: add data, raise model.context, set data.overlong = \"truncate\", or change data.val_fraction",
            all.len(), stats.records, stats.dropped_overlong, stats.dropped_no_loss, data.val_fraction
        );
    }
    let val = all.split_off(all.len() - n_val);
    Ok(SftData { train: all, val, stats })
}

/// A batch of examples, right-padded with `pad` to the longest: inputs `ids[..n-1]`, targets
/// `ids[1..]`, mask from the loss mask (0 on padding).
pub fn pad_batch(examples: &[&Example], pad: u32) -> Batch {
    let t = examples.iter().map(|e| e.ids.len() - 1).max().unwrap_or(1).max(1);
    let b = examples.len();
    let (mut inputs, mut targets, mut mask) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t), Vec::with_capacity(b * t));
    let mut tokens = 0;
    for e in examples {
        let n = e.ids.len() - 1;
        tokens += n;
        inputs.extend(e.ids[..n].iter().map(|&x| x as i64));
        targets.extend(e.ids[1..].iter().map(|&x| x as i64));
        mask.extend(e.loss_mask[1..].iter().map(|&m| m as u8 as f32));
        inputs.extend(std::iter::repeat_n(pad as i64, t - n));
        targets.extend(std::iter::repeat_n(pad as i64, t - n));
        mask.extend(std::iter::repeat_n(0.0, t - n));
    }
    Batch { inputs, targets, mask, batch: b, context: t, tokens, starts: None, pairs: None }
}

/// Shuffled epochs over the rows (one example each, or several packed), `batch` rows at a
/// time; `(epoch, index)` is all its state.
pub struct ExampleLoader {
    examples: Vec<Example>,
    rows: Vec<Vec<usize>>,
    packed: bool,
    batch: usize,
    pad: u32,
    pub epochs: Epochs,
}

impl ExampleLoader {
    /// With `packed`, examples share rows of `context` positions (best-fit decreasing).
    pub fn new(examples: Vec<Example>, packed: bool, context: usize, batch: usize, seed: u64, pad: u32, pos: LoaderPos) -> Self {
        let rows = if packed { best_fit_decreasing(&examples, context) } else { (0..examples.len()).map(|i| vec![i]).collect() };
        let epochs = Epochs::new(rows.len(), seed, pos);
        Self { examples, rows, packed, batch, pad, epochs }
    }

    /// Rows per epoch.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    pub fn next_batch(&mut self) -> Batch {
        let picked = self.epochs.take(self.batch);
        self.batch_of(&picked)
    }

    fn batch_of(&self, rows: &[usize]) -> Batch {
        if self.packed {
            packed_batch(&self.examples, &rows.iter().map(|&r| self.rows[r].as_slice()).collect::<Vec<_>>(), self.pad)
        } else {
            pad_batch(&rows.iter().map(|&r| &self.examples[self.rows[r][0]]).collect::<Vec<_>>(), self.pad)
        }
    }

    /// The rows in order, batched: the first `n` batches (validation).
    pub fn in_order(&self, n: usize) -> Vec<Batch> {
        let all: Vec<usize> = (0..self.rows.len()).collect();
        all.chunks(self.batch).take(n.max(1)).map(|c| self.batch_of(c)).collect()
    }

    /// The share of batch positions that are padding over one epoch (each batch is padded to
    /// its longest row).
    pub fn padding_share(&self) -> f64 {
        let width = |r: usize| self.rows[r].iter().map(|&i| self.examples[i].ids.len() - 1).sum::<usize>();
        let (mut real, mut total) = (0usize, 0usize);
        for chunk in self.epochs.order().chunks(self.batch) {
            let w: Vec<usize> = chunk.iter().map(|&r| width(r as usize)).collect();
            real += w.iter().sum::<usize>();
            total += w.iter().max().unwrap_or(&0) * w.len();
        }
        1.0 - real as f64 / total.max(1) as f64
    }
}
