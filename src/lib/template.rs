//! The prompt template (tinybit(7), PROMPT TEMPLATE): the one rendering that training (SFT)
//! learns and tb-chat sends. A conversation becomes a list of pieces — plain text or a special
//! token — each marked as learned (assistant output) or not; tokens follow from the pieces, so
//! training and chat produce the same ids.
//!
//! ```text
//! system: {system prompt}\ntools: {one line per tool}\n\n
//! user: {message}\n\n
//! assistant: {reply}<|tool_call|>{json}<|end_tool_call|><|tool_result|>{json}<|end_tool_result|>{reply}<|endoftext|>\n\n
//! ```
//!
//! Official RWKV-7 imports use their own template: `System: …\n\nUser: …\n\nAssistant: …\n\n`.

use crate::checkpoint::TEMPLATE_RWKV;
use crate::error::{Error, Result};
use crate::tokenizer::{Special, Tokenizer};
use serde::{Deserialize, Serialize};

/// One message of a conversation (`{"role": ..., "content": ...}` in JSON Lines data).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    #[serde(default)]
    pub content: String,
    /// An assistant message may end in a tool call: `{"tool": ..., "args": {...}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call: Option<serde_json::Value>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            tool_call: None,
        }
    }
}

/// A conversation as stored in SFT data: `{"messages": [...]}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
    /// The tool lines the system turn shows (`name(arg: type) - description`, as `tb-chat` shows
    /// the registry's tools); none: no `tools:` line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
}

/// A piece of rendered text.
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Text(String),
    Special(Special),
}

/// A rendered piece and whether training learns it.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub piece: Piece,
    pub learn: bool,
}

/// Collapses runs of blank lines to one newline: inside a message a blank line would read as the
/// end of the turn.
pub fn clean(text: &str) -> String {
    // Blank (or whitespace-only) lines are dropped; every other line is kept as it is, indentation
    // included (code keeps its shape).
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

struct Builder(Vec<Span>);

impl Builder {
    fn text(&mut self, s: &str, learn: bool) {
        if s.is_empty() {
            return;
        }
        match self.0.last_mut() {
            Some(Span {
                piece: Piece::Text(t),
                learn: l,
            }) if *l == learn => t.push_str(s),
            _ => self.0.push(Span {
                piece: Piece::Text(s.into()),
                learn,
            }),
        }
    }
    fn special(&mut self, s: Special, learn: bool) {
        self.0.push(Span {
            piece: Piece::Special(s),
            learn,
        });
    }
}

/// Renders a conversation with the tinybit template. `tools` are the registry's prompt lines;
/// they follow the system prompt. When `open_assistant` is set, the rendering ends with an open
/// `assistant: ` turn for the model to complete (chat); otherwise each assistant turn is closed
/// with `<|endoftext|>` (training).
pub fn render(messages: &[Message], tools: &[String], open_assistant: bool) -> Result<Vec<Span>> {
    let mut b = Builder(Vec::new());
    let mut i = 0;
    while i < messages.len() {
        let m = &messages[i];
        match m.role.as_str() {
            "system" => {
                b.text(&format!("system: {}", clean(&m.content)), false);
                if !tools.is_empty() {
                    b.text(&format!("\ntools: {}", tools.join("\n")), false);
                }
                b.text("\n\n", false);
                i += 1;
            }
            "user" => {
                b.text(&format!("user: {}\n\n", clean(&m.content)), false);
                i += 1;
            }
            "assistant" => {
                b.text("assistant: ", false);
                // One assistant turn: replies, tool calls and their injected results until the
                // next user or system message.
                while i < messages.len()
                    && matches!(messages[i].role.as_str(), "assistant" | "tool")
                {
                    let m = &messages[i];
                    if m.role == "tool" {
                        b.special(Special::ToolResult, false);
                        b.text(&tool_result_text(&m.content), false);
                        b.special(Special::EndToolResult, false);
                    } else {
                        b.text(&clean(&m.content), true);
                        if let Some(call) = &m.tool_call {
                            b.special(Special::ToolCall, true);
                            // Cannot fail: a JSON value always serialises.
                            b.text(&serde_json::to_string(call).expect("json"), true);
                            b.special(Special::EndToolCall, true);
                        }
                    }
                    i += 1;
                }
                b.special(Special::EndOfText, true);
                b.text("\n\n", false);
            }
            "tool" => {
                return Err(Error::Data(
                    "a tool message must follow an assistant tool call".into(),
                ));
            }
            other => {
                return Err(Error::Data(format!(
                    "unknown message role '{other}' (system, user, assistant, tool)"
                )));
            }
        }
    }
    if open_assistant {
        // Exactly the prefix training renders before a reply, so the reply's tokens line up.
        b.text("assistant: ", false);
    }
    Ok(b.0)
}

/// A tool's result as injected: JSON text stays as it is, anything else becomes a JSON string.
pub fn tool_result_text(content: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(content) {
        Ok(_) => content.trim().to_string(),
        // Cannot fail: a string always serialises.
        Err(_) => serde_json::to_string(content).expect("json"),
    }
}

/// The official RWKV-7 chat template (tinybit(7), PROMPT TEMPLATE): no special tokens, turns end
/// with a blank line.
pub fn render_rwkv(messages: &[Message], open_assistant: bool) -> Result<Vec<Span>> {
    let mut b = Builder(Vec::new());
    for m in messages {
        let role = match m.role.as_str() {
            "system" => "System",
            "user" => "User",
            "assistant" => "Assistant",
            other => {
                return Err(Error::Data(format!(
                    "the rwkv template has no '{other}' role"
                )));
            }
        };
        b.text(
            &format!("{role}: {}\n\n", clean(&m.content)),
            m.role == "assistant",
        );
    }
    if open_assistant {
        b.text("Assistant:", false);
    }
    Ok(b.0)
}

/// Renders with the template a checkpoint names.
pub fn render_named(
    name: &str,
    messages: &[Message],
    tools: &[String],
    open_assistant: bool,
) -> Result<Vec<Span>> {
    if name == TEMPLATE_RWKV {
        render_rwkv(messages, open_assistant)
    } else {
        render(messages, tools, open_assistant)
    }
}

/// The rendered string (special tokens as their markers): what the template means, byte for byte.
pub fn to_string(spans: &[Span]) -> String {
    spans
        .iter()
        .map(|s| match &s.piece {
            Piece::Text(t) => t.clone(),
            Piece::Special(sp) => sp.as_str().to_string(),
        })
        .collect()
}

/// Token ids and, per id, whether it is learned. Text is encoded with special-token matching off,
/// so message text can never forge a marker.
pub fn to_tokens(spans: &[Span], tok: &Tokenizer) -> Result<(Vec<u32>, Vec<bool>)> {
    let (mut ids, mut learn) = (Vec::new(), Vec::new());
    for s in spans {
        let piece_ids = match &s.piece {
            Piece::Text(t) => tok.encode(t)?,
            Piece::Special(sp) => vec![tok.special_id(*sp).ok_or_else(|| {
                Error::Data(format!("the tokenizer has no {} token", sp.as_str()))
            })?],
        };
        learn.extend(std::iter::repeat_n(s.learn, piece_ids.len()));
        ids.extend(piece_ids);
    }
    Ok((ids, learn))
}

#[cfg(test)]
mod tests {
    use super::clean;

    #[test]
    fn clean_collapses_blank_lines_and_keeps_indentation() {
        assert_eq!(clean("a\n\n\nb"), "a\nb");
        assert_eq!(clean("fn f() {\n    x\n  \n}\n\n"), "fn f() {\n    x\n}");
        assert_eq!(clean("one line"), "one line");
    }
}
