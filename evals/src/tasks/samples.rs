//! Generations from prompts listed in the recipe, written to the report (greedy, so a report is
//! reproducible).

use crate::{EvalError, Scorer, Task, TaskResult};

pub struct Samples {
    pub prompts: Vec<String>,
    pub max_tokens: usize,
}

impl Task for Samples {
    fn name(&self) -> String {
        "samples".into()
    }
    fn run(&self, lm: &mut dyn Scorer) -> Result<TaskResult, EvalError> {
        let mut r = TaskResult { n: self.prompts.len(), ..Default::default() };
        let tok = lm.tokenizer();
        let mut prompts = Vec::with_capacity(self.prompts.len());
        for p in &self.prompts {
            let mut ids = vec![tok.bos_id];
            ids.extend(tok.encode(p).map_err(|e| EvalError::Data(e.to_string()))?);
            prompts.push(ids);
        }
        let eos = tok.eos_id;
        let outs = lm.greedy_batch(&prompts, self.max_tokens, &[eos]);
        for (p, out) in self.prompts.iter().zip(outs) {
            let text = lm.tokenizer().decode(&out).map_err(|e| EvalError::Data(e.to_string()))?;
            r.samples.push(serde_json::json!({"prompt": p, "completion": text}));
        }
        r.notes.push("greedy decoding".into());
        Ok(r)
    }
}
