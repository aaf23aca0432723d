//! Chat templates rendered with minijinja, configured like Hugging Face `apply_chat_template`
//! (Jinja2 with `trim_blocks`, `lstrip_blocks`, `raise_exception`, Python's `trim`).
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

use crate::conversation::{py_strip, Message, Role};

/// The Llama-3 template the paper trains with (BOS written by the template, content trimmed).
pub const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Qwen2.5's ChatML template for conversations without tools (with Qwen's default system prompt
/// when the conversation has none).
pub const CHATML_TEMPLATE: &str = "{%- if messages[0]['role'] == 'system' %}\n    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n{%- else %}\n    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\") %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

/// Where the template comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TemplateSpec {
    /// The model's own template when its tokenizer has one (`chat_template` in
    /// tokenizer_config.json or `chat_template.jinja` beside it), else [`LLAMA3_TEMPLATE`]: what
    /// transformers' `apply_chat_template` and vLLM use, with the paper's template as fallback.
    Auto,
    /// The paper's Llama-3 template ([`LLAMA3_TEMPLATE`]).
    Llama3,
    /// Qwen2.5 ChatML ([`CHATML_TEMPLATE`]).
    ChatMl,
    /// The `chat_template` of the model's `tokenizer_config.json`.
    Model,
    /// A Jinja file.
    File(String),
}

impl TemplateSpec {
    /// `auto`, `llama3`, `chatml`, `model`, or a path to a Jinja file.
    pub fn parse(s: &str) -> TemplateSpec {
        match s {
            "auto" => TemplateSpec::Auto,
            "llama3" => TemplateSpec::Llama3,
            "chatml" | "qwen" => TemplateSpec::ChatMl,
            "model" => TemplateSpec::Model,
            path => TemplateSpec::File(path.to_string()),
        }
    }
}

/// Special-token strings from the tokenizer config that templates refer to.
#[derive(Debug, Clone, Default)]
pub struct TemplateTokens {
    pub bos_token: String,
    pub eos_token: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The Jinja source (hashed into the manifest key).
    pub source: String,
    pub tokens: TemplateTokens,
    /// The token that ends every assistant turn (`<|eot_id|>`, `<|im_end|>`, else EOS).
    pub end_of_turn: String,
}

#[derive(Serialize)]
struct RenderContext<'a> {
    messages: &'a [Message],
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
}

/// The rendered text of one conversation: `full` starts with `context`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedSplit {
    /// Everything but the last assistant turn, plus the generation prompt (assistant header).
    pub context: String,
    /// The whole conversation.
    pub full: String,
}

impl ChatTemplate {
    /// Resolve a [`TemplateSpec`] (the model template comes from `model_chat_template`).
    pub fn from_spec(
        spec: &TemplateSpec,
        tokens: TemplateTokens,
        model_chat_template: Option<&str>,
    ) -> Result<ChatTemplate> {
        let spec = match spec {
            TemplateSpec::Auto if model_chat_template.is_some() => &TemplateSpec::Model,
            TemplateSpec::Auto => &TemplateSpec::Llama3,
            other => other,
        };
        let source = match spec {
            TemplateSpec::Auto => unreachable!("resolved above"),
            TemplateSpec::Llama3 => LLAMA3_TEMPLATE.to_string(),
            TemplateSpec::ChatMl => CHATML_TEMPLATE.to_string(),
            TemplateSpec::Model => model_chat_template
                .ok_or_else(|| {
                    anyhow!("template `model` asked for, but the tokenizer_config.json has no chat_template")
                })?
                .to_string(),
            TemplateSpec::File(path) => std::fs::read_to_string(Path::new(path))
                .with_context(|| format!("reading chat template file {path}"))?,
        };
        let tokens = match spec {
            // The built-ins know their own BOS; a config without one must not break them.
            TemplateSpec::Llama3 if tokens.bos_token.is_empty() => {
                TemplateTokens { bos_token: "<|begin_of_text|>".into(), ..tokens }
            }
            _ => tokens,
        };
        ChatTemplate::new(source, tokens)
    }

    pub fn new(source: String, tokens: TemplateTokens) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        // Hugging Face renders with jinja2.Environment(trim_blocks=True, lstrip_blocks=True).
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| anyhow!("{e}"))?,
        );
        env.add_filter("trim", |value: String| -> String { py_strip(&value).to_string() });
        env.add_function("raise_exception", |message: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source.clone())
            .map_err(|e| anyhow!("chat template does not compile: {e}"))?;
        let end_of_turn = if source.contains("<|eot_id|>") {
            "<|eot_id|>".to_string()
        } else if source.contains("<|im_end|>") {
            "<|im_end|>".to_string()
        } else {
            tokens.eos_token.clone()
        };
        if end_of_turn.is_empty() {
            bail!("cannot tell the template's end-of-turn token: it uses neither <|eot_id|> nor <|im_end|> and the tokenizer config names no eos_token");
        }
        Ok(ChatTemplate { env, source, tokens, end_of_turn })
    }

    /// Render `messages` (as `apply_chat_template(messages, add_generation_prompt=...)`).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").map_err(|e| anyhow!("{e}"))?;
        let ctx = RenderContext {
            messages,
            add_generation_prompt,
            bos_token: &self.tokens.bos_token,
            eos_token: &self.tokens.eos_token,
        };
        template.render(minijinja::value::Serde(&ctx)).map_err(|e| anyhow!("chat template failed: {e}"))
    }

    /// Render the context (all but the last assistant turn, with the generation prompt) and the
    /// full conversation. The last message must be an assistant turn.
    pub fn render_split(&self, messages: &[Message]) -> Result<RenderedSplit> {
        match messages.last() {
            Some(m) if m.role == Role::Assistant => {}
            _ => bail!("conversation does not end with an assistant turn"),
        }
        let context = self.render(&messages[..messages.len() - 1], true)?;
        let full = self.render(messages, false)?;
        if !full.starts_with(&context) {
            bail!("the rendered context is not a prefix of the rendered conversation");
        }
        Ok(RenderedSplit { context, full })
    }

    /// Special-token strings the template writes (`<|...|>` literals and the BOS it is given):
    /// the tokenizer must know every one of them as a single token.
    pub fn required_special_tokens(&self) -> Vec<String> {
        let mut found: Vec<String> = Vec::new();
        let bytes = self.source.as_bytes();
        let mut i = 0;
        while let Some(start) = self.source[i..].find("<|").map(|p| p + i) {
            match self.source[start + 2..].find("|>") {
                Some(len) if len <= 64 && !self.source[start + 2..start + 2 + len].contains(['\'', '"', ' ', '\n', '{']) => {
                    let token = &self.source[start..start + 2 + len + 2];
                    if !found.iter().any(|t| t == token) {
                        found.push(token.to_string());
                    }
                    i = start + 2 + len + 2;
                }
                _ => i = start + 2,
            }
            if i >= bytes.len() {
                break;
            }
        }
        if self.source.contains("bos_token") && !self.tokens.bos_token.is_empty() && !found.contains(&self.tokens.bos_token) {
            found.push(self.tokens.bos_token.clone());
        }
        if !found.contains(&self.end_of_turn) {
            found.push(self.end_of_turn.clone());
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama3() -> ChatTemplate {
        ChatTemplate::from_spec(&TemplateSpec::Llama3, TemplateTokens::default(), None).unwrap()
    }

    #[test]
    fn llama3_renders_the_paper_format() {
        let t = llama3();
        let msgs = vec![Message::new(Role::User, " Hi \n"), Message::new(Role::Assistant, "Hello!")];
        let split = t.render_split(&msgs).unwrap();
        assert_eq!(
            split.context,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(split.full, format!("{}Hello!<|eot_id|>", split.context));
        assert_eq!(
            t.required_special_tokens(),
            vec!["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>"]
        );
    }

    #[test]
    fn chatml_renders_qwen_format() {
        let t = ChatTemplate::from_spec(&TemplateSpec::ChatMl, TemplateTokens::default(), None).unwrap();
        let msgs = vec![Message::new(Role::User, "Hi"), Message::new(Role::Assistant, "Yo")];
        let split = t.render_split(&msgs).unwrap();
        assert_eq!(split.context, "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(split.full, format!("{}Yo<|im_end|>\n", split.context));
        assert_eq!(t.end_of_turn, "<|im_end|>");
    }
}
