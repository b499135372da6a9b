//! Why QEMU refused to start, as users read it.

/// The longest reason for a failed start sent to the parent (and vmctl).
pub const START_REASON_MAX: usize = 400;

/// Why QEMU refused to start, from one line of its standard error: the
/// line without the program name, a `-blockdev` node named as the disk
/// the user knows (`disk 1`, `disk 1's backing file 1`, `cdrom`) instead
/// of its JSON, cut at [`START_REASON_MAX`]. None for a warning or an
/// empty line.
pub fn qemu_error_reason(line: &str) -> Option<String> {
    let text = line.trim();
    let text = ["qemu-system-x86_64: ", "qemu: "]
        .iter()
        .find_map(|prefix| text.strip_prefix(prefix))
        .unwrap_or(text);
    if text.is_empty() || text.starts_with("warning:") {
        return None;
    }
    let text = match text.strip_prefix("-blockdev ").and_then(blockdev_error) {
        Some(named) => named,
        None => text.to_string(),
    };
    Some(start_reason(&format!("QEMU: {text}")))
}

/// A reason for a failed start as it may reach vmctl: one line (control
/// characters replaced, so nothing reaches the user's terminal as an
/// escape sequence), at most [`START_REASON_MAX`] characters.
pub fn start_reason(text: &str) -> String {
    cut(&crate::log::sanitize(text), START_REASON_MAX)
}

/// `{node JSON}: message` as `disk N: message`, if the node is ours.
fn blockdev_error(text: &str) -> Option<String> {
    let mut nodes = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
    let node = nodes.next()?.ok()?;
    let message = text[nodes.byte_offset()..].strip_prefix(": ")?;
    let name = node.get("node-name")?.as_str()?;
    let name = name.strip_suffix("-file").unwrap_or(name);
    let what = if name == "cd0" {
        "cdrom".to_string()
    } else {
        let (disk, layer) = name.strip_prefix("disk")?.split_once('-')?;
        let disk = disk.parse::<u32>().ok()? + 1;
        match layer.parse::<u32>().ok()? {
            0 => format!("disk {disk}"),
            layer => format!("disk {disk}'s backing file {layer}"),
        }
    };
    Some(format!("{what}: {message}"))
}

/// `text`, or its start and "..." in `max` characters.
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let start: String = text.chars().take(max.saturating_sub(3)).collect();
    format!("{start}...")
}
