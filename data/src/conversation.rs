//! Normalised conversations: roles mapped to `system` / `user` / `assistant`, empty turns dropped.
use serde::{Deserialize, Serialize};

/// The three roles every chat template understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// Map the role names used by OpenHermes (`human`, `gpt`), Infinity-Instruct and the
    /// role/content mirrors (`user`, `assistant`) to a [`Role`]. Unknown names give `None`.
    pub fn parse(name: &str) -> Option<Role> {
        match name.trim().to_ascii_lowercase().as_str() {
            "system" => Some(Role::System),
            "human" | "user" => Some(Role::User),
            "gpt" | "assistant" | "bot" | "model" => Some(Role::Assistant),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn, serialised as `{role, content}` for the chat template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message { role, content: content.into() }
    }
}

/// A conversation as read from a source, before filtering.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conversation {
    pub messages: Vec<Message>,
    /// Language tag from the source (Infinity-Instruct's `langdetect`, or a `language`/`lang`
    /// field), if any.
    pub language: Option<String>,
}

/// Python's `str.isspace()` (which Jinja2's `trim` uses): Unicode White_Space plus the ASCII
/// information separators U+001C..U+001F, which Rust's `char::is_whitespace` leaves out.
pub fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

/// Why a conversation cannot be used, before templating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    UnknownRole(String),
    NoAssistantTurn,
}

/// Turn raw `(role name, content)` pairs into a normalised conversation: roles mapped, empty
/// (whitespace-only) turns dropped, and turns after the last assistant turn dropped (they have
/// no target). A leading `system_prompt` is prepended as a system turn when the conversation
/// does not already start with one.
pub fn normalise(
    turns: Vec<(String, String)>,
    system_prompt: Option<String>,
) -> Result<Vec<Message>, Unusable> {
    let mut messages = normalise_turns(turns, system_prompt)?;
    let last_assistant = messages
        .iter()
        .rposition(|m| m.role == Role::Assistant)
        .ok_or(Unusable::NoAssistantTurn)?;
    messages.truncate(last_assistant + 1);
    Ok(messages)
}

/// Roles mapped, empty (whitespace-only) turns dropped and the `system_prompt` prepended, as
/// [`normalise`] does, with every turn kept.
pub fn normalise_turns(
    turns: Vec<(String, String)>,
    system_prompt: Option<String>,
) -> Result<Vec<Message>, Unusable> {
    let mut messages = Vec::with_capacity(turns.len() + 1);
    for (role_name, content) in turns {
        let role = Role::parse(&role_name).ok_or(Unusable::UnknownRole(role_name))?;
        if py_strip(&content).is_empty() {
            continue;
        }
        messages.push(Message { role, content });
    }
    if let Some(prompt) = system_prompt {
        let starts_with_system = messages.first().map(|m| m.role == Role::System).unwrap_or(false);
        if !py_strip(&prompt).is_empty() && !starts_with_system {
            messages.insert(0, Message::new(Role::System, prompt));
        }
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_normalised_and_empty_turns_dropped() {
        let turns = vec![
            ("human".to_string(), "hi".to_string()),
            ("gpt".to_string(), "  \n".to_string()),
            ("gpt".to_string(), "hello".to_string()),
            ("human".to_string(), "dangling".to_string()),
        ];
        let m = normalise(turns, Some("be nice".into())).unwrap();
        assert_eq!(
            m,
            vec![
                Message::new(Role::System, "be nice"),
                Message::new(Role::User, "hi"),
                Message::new(Role::Assistant, "hello")
            ]
        );
    }

    #[test]
    fn no_assistant_and_unknown_role() {
        let only_user = vec![("user".to_string(), "hi".to_string())];
        assert_eq!(normalise(only_user, None), Err(Unusable::NoAssistantTurn));
        let tool = vec![("tool".to_string(), "x".to_string())];
        assert_eq!(normalise(tool, None), Err(Unusable::UnknownRole("tool".into())));
    }

    #[test]
    fn python_strip_semantics() {
        assert_eq!(py_strip("\u{1f} a \u{3000}\n"), "a");
    }
}
