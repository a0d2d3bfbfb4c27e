//! Chat templates and loss masks. A conversation is a list of messages; it becomes text through
//! the model's own Jinja template (rendered by minijinja with Python's string methods, the way
//! Hugging Face's servers do), or ChatML where the model has none. Training, `kiln chat`, evals
//! and export all render through [`ChatTemplate::render`].
//!
//! The loss mask comes from rendering prefixes, never from searching for markers: for each
//! assistant message `i`, `render(messages[..i], generation prompt)` and `render(messages[..=i])`
//! differ by exactly that reply (its end-of-turn token included), and the tokens that start inside
//! that difference carry loss.

use minijinja::syntax::SyntaxConfig;
use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::tokenizer::Tokenizer;
use crate::ModelError;

/// ChatML, the template used where a model brings none (`<|im_start|>role\ncontent<|im_end|>\n`).
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
/// The special tokens ChatML needs; added to a tokenizer that lacks them.
pub const CHATML_TOKENS: [&str; 2] = ["<|im_start|>", "<|im_end|>"];
/// End-of-turn tokens of the common templates, besides the tokenizer's EOS.
const END_OF_TURN: [&str; 4] = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"];

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// Which assistant messages carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    /// Every assistant message.
    #[default]
    Assistant,
    /// Only the last assistant message.
    LastAssistant,
    /// Every token (the template's markers and the prompts too).
    All,
}

/// A tokenized conversation: ids and, per id, whether it is a target that carries loss.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatExample {
    pub text: String,
    pub ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
    /// Byte ranges of `text` that carry loss.
    pub spans: Vec<(usize, usize)>,
}

/// A compiled chat template and the special tokens it may write.
pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: String,
    bos: String,
    eos: String,
}

fn template_err(e: Error) -> ModelError {
    let mut m = format!("chat template: {e}");
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        m.push_str(&format!(": {s}"));
        src = s.source();
    }
    ModelError::Tokenizer(m)
}

impl ChatTemplate {
    /// The template `source`, or the tokenizer's own, or ChatML.
    pub fn new(tok: &Tokenizer, source: Option<&str>) -> Result<Self, ModelError> {
        let source = source.map(str::to_string).or_else(|| tok.chat_template.clone()).unwrap_or_else(|| CHATML.to_string());
        let mut env = Environment::new();
        // Hugging Face compiles templates with trim_blocks and lstrip_blocks.
        let syntax = SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().map_err(template_err)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> { Err(Error::new(ErrorKind::InvalidOperation, msg)) });
        env.add_template_owned("chat", source.clone()).map_err(template_err)?;
        let name = |id: u32| tok.id_to_token(id).unwrap_or_default();
        Ok(Self { env, source, bos: name(tok.bos_id), eos: name(tok.eos_id) })
    }

    /// The conversation as text; with `add_generation_prompt`, followed by the opening of an
    /// assistant turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ModelError> {
        let t = self.env.get_template("chat").map_err(template_err)?;
        t.render(context! { messages => messages_value(messages), add_generation_prompt => add_generation_prompt, bos_token => &self.bos, eos_token => &self.eos })
            .map_err(template_err)
    }

    /// Byte ranges of `render(messages)` that carry loss under `train_on`.
    pub fn loss_spans(&self, messages: &[Message], train_on: TrainOn) -> Result<(String, Vec<(usize, usize)>), ModelError> {
        let full = self.render(messages, false)?;
        if train_on == TrainOn::All {
            return Ok((full.clone(), vec![(0, full.len())]));
        }
        let assistant: Vec<usize> = messages.iter().enumerate().filter(|(_, m)| m.role == "assistant").map(|(i, _)| i).collect();
        let chosen = match train_on {
            TrainOn::LastAssistant => assistant.last().copied().into_iter().collect(),
            _ => assistant,
        };
        let mut spans = Vec::new();
        for i in chosen {
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(ModelError::Tokenizer(format!(
                    "chat template: rendering messages[..{i}] with the generation prompt is not a prefix of rendering messages[..={i}] (or of the whole conversation), so the loss on message {i} cannot be told apart\n  hint: use a template that renders earlier turns unchanged (data.chat_template), or train_on = \"all\""
                )));
            }
            if through.len() > before.len() {
                spans.push((before.len(), through.len()));
            }
        }
        Ok((full, spans))
    }

    /// Renders and tokenizes a conversation with its loss mask: a token carries loss when its
    /// first byte lies in a loss span.
    pub fn encode(&self, tok: &Tokenizer, messages: &[Message], train_on: TrainOn) -> Result<ChatExample, ModelError> {
        let (text, spans) = self.loss_spans(messages, train_on)?;
        let (ids, offsets) = tok.encode_with_offsets(&text)?;
        let loss_mask = offsets.iter().map(|&(a, b)| a < b && spans.iter().any(|&(s, e)| a >= s && a < e)).collect();
        Ok(ChatExample { text, ids, loss_mask, spans })
    }

    /// The prompt for a reply: the conversation so far and the opening of an assistant turn.
    pub fn prompt_ids(&self, tok: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>, ModelError> {
        tok.encode(&self.render(messages, true)?)
    }
}

/// Messages as template values: a list of `{"role", "content"}` maps.
fn messages_value(messages: &[Message]) -> minijinja::Value {
    let list: Vec<minijinja::Value> = messages.iter().map(|m| minijinja::Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())])).collect();
    minijinja::Value::from(list)
}

/// The ids that end an assistant turn: the tokenizer's EOS and the common end-of-turn tokens
/// the vocabulary has.
pub fn stop_ids(tok: &Tokenizer) -> Vec<u32> {
    let mut ids = vec![tok.eos_id];
    ids.extend(END_OF_TURN.iter().filter_map(|t| tok.token_to_id(t)));
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        let mut t = Tokenizer::byte_level().unwrap();
        t.add_special_tokens(&CHATML_TOKENS);
        t
    }

    fn convo() -> Vec<Message> {
        vec![
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello!"),
            Message::new("user", "2+2?"),
            Message::new("assistant", "4"),
        ]
    }

    #[test]
    fn chatml_renders_with_and_without_generation_prompt() {
        let c = ChatTemplate::new(&tok(), None).unwrap();
        let m = &convo()[1..2];
        assert_eq!(c.render(m, false).unwrap(), "<|im_start|>user\nHi<|im_end|>\n");
        assert_eq!(c.render(m, true).unwrap(), "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn only_assistant_tokens_carry_loss_end_of_turn_included() {
        let t = tok();
        let c = ChatTemplate::new(&t, None).unwrap();
        let ex = c.encode(&t, &convo(), TrainOn::Assistant).unwrap();
        let lossy: Vec<u32> = ex.ids.iter().zip(&ex.loss_mask).filter(|(_, &m)| m).map(|(&i, _)| i).collect();
        assert_eq!(t.decode(&lossy).unwrap(), "Hello!\n4\n");
        let im_end = t.token_to_id("<|im_end|>").unwrap();
        assert_eq!(lossy.iter().filter(|&&i| i == im_end).count(), 2);
        let last = c.encode(&t, &convo(), TrainOn::LastAssistant).unwrap();
        let n = |e: &ChatExample| e.loss_mask.iter().filter(|&&m| m).count();
        assert_eq!(n(&last), "4".len() + 2);
        assert_eq!(n(&c.encode(&t, &convo(), TrainOn::All).unwrap()), ex.ids.len());
    }

    #[test]
    fn a_template_that_rewrites_history_is_an_error_not_a_wrong_mask() {
        let t = tok();
        // Drops every assistant message but the last: prefixes stop being prefixes.
        let src = "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}";
        let c = ChatTemplate::new(&t, Some(src)).unwrap();
        let e = c.encode(&t, &convo(), TrainOn::Assistant).unwrap_err().to_string();
        assert!(e.contains("prefix"), "{e}");
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let t = tok();
        let src = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{% for m in messages %}{{ m.content.strip().upper() }}|{% endfor %}";
        let c = ChatTemplate::new(&t, Some(src)).unwrap();
        assert_eq!(c.render(&[Message::new("user", "  hi ")], false).unwrap(), "HI|");
        let e = c.render(&convo(), false).unwrap_err().to_string();
        assert!(e.contains("no system"), "{e}");
        assert!(ChatTemplate::new(&t, Some("{% for %}")).is_err());
    }
}
