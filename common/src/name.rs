//! The rule for VM names, shared by vm.conf and vmctl.

use thiserror::Error;

/// VM names are shorter than this many bytes (VMM_MAX_NAME_LEN).
pub const VM_NAME_MAX: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("invalid VM name")]
    Invalid,
    #[error("vm name too long")]
    TooLong,
}

/// Alphanumerics, '.', '-' and '_', not starting with '.', '-' or '_'.
pub fn check_vm_name(name: &str) -> Result<(), NameError> {
    if name.len() >= VM_NAME_MAX {
        return Err(NameError::TooLong);
    }
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    match name.chars().next() {
        Some(first) if first.is_ascii_alphanumeric() && name.chars().all(valid_char) => Ok(()),
        _ => Err(NameError::Invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names() {
        assert_eq!(check_vm_name("web-1.example_a"), Ok(()));
        assert_eq!(check_vm_name("1vm"), Ok(()));
        assert_eq!(check_vm_name(""), Err(NameError::Invalid));
        assert_eq!(check_vm_name("-vm"), Err(NameError::Invalid));
        assert_eq!(check_vm_name("_vm"), Err(NameError::Invalid));
        assert_eq!(check_vm_name(".vm"), Err(NameError::Invalid));
        assert_eq!(check_vm_name("v m"), Err(NameError::Invalid));
        assert_eq!(check_vm_name(&"a".repeat(63)), Ok(()));
        assert_eq!(check_vm_name(&"a".repeat(64)), Err(NameError::TooLong));
    }
}
