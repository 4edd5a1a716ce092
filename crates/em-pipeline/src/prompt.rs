//! The one path from a problem to what a model sees: text and token ids.
//!
//! Screen, eval and train all render through [`PromptRenderer`]; every output records what it
//! rendered. Styles:
//! - `chat`: the model's own chat template (GGUF `tokenizer.chat_template`, `tokenizer_config.json`
//!   or `chat_template.jinja`), rendered as transformers' `apply_chat_template` does, with the
//!   problem's own messages (pool items) or the toolkit's turns (system = the step-by-step
//!   sentence, user = the question);
//! - `qwen25-math-cot`: the Qwen2.5-Math toolkit's prompt, ChatML written out, whatever the model;
//! - `plain`: `Question: …` text for base models without a template;
//! - `auto` (the default): a problem that brings its own messages (a pool prompt, as the reference
//!   trains) goes through the model's template; a bare problem (a benchmark item) gets the
//!   toolkit's prompt: `qwen25-math-cot` for a ChatML template, else the toolkit's turns through
//!   the model's template.
//!
//! BOS: a chat-style prompt is tokenized as `apply_chat_template(tokenize=True)` does, adding no
//! special token beyond what the template writes; a plain prompt as `tokenizer(text)` does, with
//! the BOS the tokenizer adds. A prompt never starts with two BOS tokens.

use em_data::{ChatMessage, ChatTemplate, Problem, QWEN_MATH_COT_SYSTEM, STEP_BY_STEP};
use em_sampler::{Prompt, Vocab};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How a problem becomes a prompt (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Style {
    /// Pool prompts through the model's template; benchmark items as the toolkit prompts them.
    #[default]
    Auto,
    /// The model's own chat template.
    Chat,
    /// The Qwen2.5-Math toolkit's `qwen25-math-cot` prompt.
    #[cfg_attr(feature = "clap", value(name = "qwen25-math-cot"))]
    #[serde(rename = "qwen25-math-cot")]
    Qwen25MathCot,
    /// `Question: … Answer:` text.
    Plain,
}

/// Prompt settings: the style and optional overrides of the turns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PromptOptions {
    /// How a problem becomes a prompt.
    pub style: Style,
    /// Replace the system turn (an empty string drops it).
    pub system: Option<String>,
    /// Append this to the user turn.
    pub user_suffix: Option<String>,
}

/// A prompt rendered for a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RenderedPrompt {
    pub text: String,
    pub ids: Vec<u32>,
}

impl RenderedPrompt {
    /// As a sampler prompt: the ids, with the text for servers that take only text.
    pub fn to_prompt(&self) -> Prompt {
        Prompt::Rendered {
            text: self.text.clone(),
            tokens: self.ids.clone(),
        }
    }
}

/// Renders problems for one model; built once per run (it reads the template once).
pub struct PromptRenderer<'v> {
    vocab: &'v dyn Vocab,
    options: PromptOptions,
    template: Option<ChatTemplate>,
    /// The style and, where one is used, the template's origin.
    pub description: String,
}

impl<'v> PromptRenderer<'v> {
    /// Resolves `options.style` for the model behind `vocab`; a template that cannot be read is an
    /// error naming the file unless the style needs none.
    pub fn new(vocab: &'v dyn Vocab, options: &PromptOptions) -> Result<Self> {
        let (template, description) = match options.style {
            Style::Plain => (None, "plain".to_string()),
            Style::Qwen25MathCot => (None, "qwen25-math-cot".to_string()),
            Style::Chat | Style::Auto => {
                let source = vocab.chat_template()?;
                let (bos_token, eos_token) = vocab.special_texts();
                let t = ChatTemplate {
                    template: source.template,
                    bos_token,
                    eos_token,
                };
                // Compile now, so a broken template fails before any work, naming its file.
                t.render(&[ChatMessage {
                    role: "user".into(),
                    content: "1+1".into(),
                }])
                .map_err(|e| Error::msg(format!("{}: {e}", source.origin)))?;
                let name = if options.style == Style::Auto {
                    "auto"
                } else {
                    "chat"
                };
                (Some(t), format!("{name} ({})", source.origin))
            }
        };
        Ok(Self {
            vocab,
            options: options.clone(),
            template,
            description,
        })
    }

    /// The turns rendered for `problem`: its own messages, else the toolkit's turns, with the
    /// overrides applied (the plain style uses only the user turns).
    pub fn messages(&self, problem: &Problem) -> Vec<ChatMessage> {
        let mut messages = match &problem.messages {
            Some(m) if !m.is_empty() => m.clone(),
            _ => vec![
                ChatMessage {
                    role: "system".into(),
                    content: QWEN_MATH_COT_SYSTEM.into(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: toolkit_question(problem),
                },
            ],
        };
        if let Some(system) = &self.options.system {
            messages.retain(|m| m.role != "system");
            if !system.is_empty() {
                messages.insert(
                    0,
                    ChatMessage {
                        role: "system".into(),
                        content: system.clone(),
                    },
                );
            }
        }
        if let Some(suffix) = &self.options.user_suffix {
            if let Some(m) = messages.iter_mut().rev().find(|m| m.role == "user") {
                m.content.push_str(suffix);
            }
        }
        messages
    }

    /// The prompt text for `problem`.
    pub fn text(&self, problem: &Problem) -> Result<String> {
        let chatml = |messages: Vec<ChatMessage>| {
            let mut s = String::new();
            for m in messages {
                s.push_str(&format!(
                    "<|im_start|>{}\n{}<|im_end|>\n",
                    m.role, m.content
                ));
            }
            s + "<|im_start|>assistant\n"
        };
        let through_template = |t: &ChatTemplate| {
            t.render(&self.messages(problem))
                .map_err(|e| Error::msg(format!("prompt {}: {e}", problem.id)))
        };
        Ok(match (self.options.style, &self.template) {
            (Style::Qwen25MathCot, _) => chatml(self.messages(problem)),
            (Style::Auto, Some(t))
                if problem.messages.is_none() && t.template.contains("<|im_start|>") =>
            {
                chatml(self.messages(problem))
            }
            (Style::Chat | Style::Auto, Some(t)) => through_template(t)?,
            _ => self.plain(problem),
        })
    }

    fn plain(&self, problem: &Problem) -> String {
        let question = self
            .messages(problem)
            .into_iter()
            .filter(|m| m.role == "user")
            .map(|m| m.content)
            .collect::<Vec<_>>()
            .join("\n");
        let system = match &self.options.system {
            Some(s) if !s.is_empty() => format!("{s}\n"),
            Some(_) => String::new(),
            None if problem.messages.is_some() => String::new(),
            None => format!("{STEP_BY_STEP}\n"),
        };
        format!("Question: {question}\n{system}Answer: Let's think step by step.")
    }

    /// Text and ids of the prompt for `problem` (see the module documentation for BOS).
    pub fn render(&self, problem: &Problem) -> Result<RenderedPrompt> {
        let text = self.text(problem)?;
        let mut ids = self.vocab.tokenize(&text)?;
        if let (Style::Plain, Some(bos)) = (self.options.style, self.vocab.auto_bos()) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        if ids.is_empty() {
            return Err(Error::msg(format!(
                "prompt {}: renders to no tokens",
                problem.id
            )));
        }
        Ok(RenderedPrompt { text, ids })
    }

    /// Every problem of the file `source`, rendered; an error names the file and the problem.
    pub fn render_all(&self, problems: &[Problem], source: &Path) -> Result<Vec<RenderedPrompt>> {
        problems
            .iter()
            .map(|p| {
                self.render(p)
                    .with_context(|| format!("{}: prompt {}", source.display(), p.id))
            })
            .collect()
    }
}

/// The toolkit's question: the problem, stripped, with " (True or False)" / " (Yes or No)"
/// appended when the gold answer is such.
pub fn toolkit_question(problem: &Problem) -> String {
    let mut q = problem.problem.clone();
    if let [gold] = problem.answers.as_slice() {
        match gold.trim().to_lowercase().as_str() {
            "true" | "false" => q.push_str(" (True or False)"),
            "yes" | "no" => q.push_str(" (Yes or No)"),
            _ => {}
        }
    }
    q.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use em_sampler::{SamplerError, TemplateSource};

    /// Bytes as ids 100 + byte, `<s>` as 1; a BOS-adding tokenizer with an optional template.
    struct FakeVocab(Option<&'static str>);

    impl Vocab for FakeVocab {
        fn tokenize(&self, text: &str) -> std::result::Result<Vec<u32>, SamplerError> {
            let mut ids = Vec::new();
            let mut rest = text;
            while !rest.is_empty() {
                if let Some(r) = rest.strip_prefix("<s>") {
                    ids.push(1);
                    rest = r;
                } else {
                    ids.push(100 + rest.as_bytes()[0] as u32);
                    rest = &rest[1..];
                }
            }
            Ok(ids)
        }
        fn token_text(&self, id: u32) -> String {
            if id == 1 {
                "<s>".into()
            } else {
                char::from((id - 100) as u8).to_string()
            }
        }
        fn auto_bos(&self) -> Option<u32> {
            Some(1)
        }
        fn special_texts(&self) -> (String, String) {
            ("<s>".into(), "</s>".into())
        }
        fn chat_template(&self) -> std::result::Result<TemplateSource, SamplerError> {
            self.0
                .map(|t| TemplateSource {
                    template: t.into(),
                    origin: "m.gguf:tokenizer.chat_template".into(),
                })
                .ok_or_else(|| {
                    SamplerError::backend(
                        "m.gguf",
                        "no `tokenizer.chat_template` in the GGUF metadata",
                    )
                })
        }
        fn origin(&self) -> String {
            "m.gguf".into()
        }
    }

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    const WITH_BOS: &str = "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]";

    fn problem(answer: &str, messages: bool) -> Problem {
        Problem {
            id: "p".into(),
            problem: "  Is 7 prime?".into(),
            answers: vec![answer.into()],
            source: "t".into(),
            messages: messages.then(|| {
                vec![ChatMessage {
                    role: "user".into(),
                    content: "Is 7 prime? Think.".into(),
                }]
            }),
        }
    }

    fn options(style: Style) -> PromptOptions {
        PromptOptions {
            style,
            ..PromptOptions::default()
        }
    }

    #[test]
    fn toolkit_prompt_exactly() {
        let v = FakeVocab(None);
        let r = PromptRenderer::new(&v, &options(Style::Qwen25MathCot)).unwrap();
        assert_eq!(
            r.text(&problem("yes", false)).unwrap(),
            "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>user\nIs 7 prime? (Yes or No)<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(r
            .text(&problem("True", false))
            .unwrap()
            .contains("Is 7 prime? (True or False)<|im_end|>"));
        assert!(r
            .text(&problem("7", false))
            .unwrap()
            .contains("\nIs 7 prime?<|im_end|>"));
        // As the toolkit does: the suffix goes on before the strip.
        let mut spaced = problem("no", false);
        spaced.problem.push_str("  ");
        assert!(r
            .text(&spaced)
            .unwrap()
            .contains("\nIs 7 prime?   (Yes or No)<|im_end|>"));
        // A chat-style prompt gets no BOS the template does not write.
        assert_ne!(r.render(&problem("7", false)).unwrap().ids[0], 1);
    }

    #[test]
    fn auto_uses_the_toolkit_for_items_and_the_template_for_pool_prompts() {
        let v = FakeVocab(Some(CHATML));
        let auto = PromptRenderer::new(&v, &options(Style::Auto)).unwrap();
        let cot = PromptRenderer::new(&v, &options(Style::Qwen25MathCot)).unwrap();
        assert_eq!(
            auto.text(&problem("7", false)).unwrap(),
            cot.text(&problem("7", false)).unwrap()
        );
        assert_eq!(
            auto.text(&problem("7", true)).unwrap(),
            "<|im_start|>user\nIs 7 prime? Think.<|im_end|>\n<|im_start|>assistant\n"
        );
        let v = FakeVocab(Some(WITH_BOS));
        let auto = PromptRenderer::new(&v, &options(Style::Auto)).unwrap();
        assert_eq!(
            auto.text(&problem("7", false)).unwrap(),
            "<s>[system] Please reason step by step, and put your final answer within \\boxed{}.\n[user] Is 7 prime?\n[assistant]"
        );
    }

    #[test]
    fn never_two_bos_and_plain_gets_the_tokenizers_bos() {
        let v = FakeVocab(Some(WITH_BOS));
        let chat = PromptRenderer::new(&v, &options(Style::Chat))
            .unwrap()
            .render(&problem("7", true))
            .unwrap();
        assert_eq!(chat.ids[0], 1);
        assert_ne!(chat.ids[1], 1);
        let plain = PromptRenderer::new(&v, &options(Style::Plain))
            .unwrap()
            .render(&problem("7", false))
            .unwrap();
        assert_eq!(plain.text, "Question: Is 7 prime?\nPlease reason step by step, and put your final answer within \\boxed{}.\nAnswer: Let's think step by step.");
        assert_eq!((plain.ids[0], plain.ids.len()), (1, plain.text.len() + 1));
    }

    #[test]
    fn overrides_and_missing_templates() {
        let v = FakeVocab(Some(CHATML));
        let o = PromptOptions {
            style: Style::Chat,
            system: Some(String::new()),
            user_suffix: Some("\nGo.".into()),
        };
        let r = PromptRenderer::new(&v, &o).unwrap();
        assert_eq!(
            r.text(&problem("7", false)).unwrap(),
            "<|im_start|>user\nIs 7 prime?\nGo.<|im_end|>\n<|im_start|>assistant\n"
        );
        let v = FakeVocab(None);
        for style in [Style::Auto, Style::Chat] {
            let e = PromptRenderer::new(&v, &options(style))
                .err()
                .unwrap()
                .to_string();
            assert!(e.starts_with("m.gguf: no `tokenizer.chat_template`"), "{e}");
        }
        let v = FakeVocab(Some("{% for m in messages %}{{ m.content }"));
        let e = PromptRenderer::new(&v, &options(Style::Chat))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("m.gguf:tokenizer.chat_template: chat template:"),
            "{e}"
        );
    }
}
