//! The QMP conversation with QEMU.

/// The QMP conversation: negotiate, then `cont`, then events and the
/// answers to commands the VM process sends with an `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QmpState {
    /// Waiting for QEMU's greeting.
    Greeting,
    /// `qmp_capabilities` sent.
    Capabilities,
    /// `cont` sent.
    Cont,
    /// The guest runs.
    Running,
}

/// What one line from QMP means to the VM process.
#[derive(Debug, PartialEq, Eq)]
pub enum QmpReply {
    /// Send this command next.
    Send(&'static str),
    /// The guest now runs.
    Running,
    /// The guest shut down (reason as QEMU names it); QEMU exits.
    Shutdown(String),
    /// A command failed.
    Error(String),
    /// QEMU broke the protocol (a line that is not JSON).
    Protocol(String),
    /// QEMU answered the command sent with this id (`error` None: done,
    /// with `value`, its `return`).
    Answer {
        id: String,
        error: Option<String>,
        value: serde_json::Value,
    },
    /// A MIGRATION event (with the `events` capability): its status.
    Migration(String),
    Nothing,
}

/// Advances the conversation by one JSON line from QEMU.
pub fn qmp_line(state: &mut QmpState, line: &str) -> QmpReply {
    let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
        let start: String = line.chars().take(80).collect();
        return QmpReply::Protocol(format!("a line that is not JSON ({start:?})"));
    };
    if let Some(event) = msg.get("event").and_then(|e| e.as_str()) {
        if event == "SHUTDOWN" {
            let reason = msg
                .pointer("/data/reason")
                .and_then(|r| r.as_str())
                .unwrap_or("unknown");
            return QmpReply::Shutdown(reason.to_string());
        }
        if event == "MIGRATION" {
            let status = msg.pointer("/data/status").and_then(|s| s.as_str());
            return QmpReply::Migration(status.unwrap_or("unknown").to_string());
        }
        return QmpReply::Nothing;
    }
    let error = msg.get("error").map(|error| {
        error
            .get("desc")
            .and_then(|d| d.as_str())
            .unwrap_or("unknown error")
            .to_string()
    });
    if let Some(id) = msg.get("id").and_then(|id| id.as_str()) {
        return QmpReply::Answer {
            id: id.to_string(),
            error,
            value: msg.get("return").cloned().unwrap_or_default(),
        };
    }
    if let Some(error) = error {
        return QmpReply::Error(error);
    }
    match *state {
        QmpState::Greeting if msg.get("QMP").is_some() => {
            *state = QmpState::Capabilities;
            QmpReply::Send("qmp_capabilities")
        }
        QmpState::Capabilities if msg.get("return").is_some() => {
            *state = QmpState::Cont;
            QmpReply::Send("cont")
        }
        QmpState::Cont if msg.get("return").is_some() => {
            *state = QmpState::Running;
            QmpReply::Running
        }
        _ => QmpReply::Nothing,
    }
}

/// A QMP command as one line.
pub fn qmp_command(name: &str) -> String {
    format!("{{\"execute\": \"{name}\"}}\n")
}

/// A QMP command whose answer carries `id` (a plain word).
pub fn qmp_command_with_id(name: &str, id: &str) -> String {
    format!("{{\"execute\": \"{name}\", \"id\": \"{id}\"}}\n")
}

/// A QMP command with arguments (a JSON object) whose answer carries `id`.
pub fn qmp_command_with_args(name: &str, args: serde_json::Value, id: &str) -> String {
    let command = serde_json::json!({"execute": name, "arguments": args, "id": id});
    format!("{command}\n")
}
