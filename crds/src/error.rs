use std::fmt;

/// A spec that cannot be accepted, with the path of the offending field
/// (`spec.ike.proposals[1]`) and a message a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    /// JSON path of the field, e.g. `spec.localSubnet`.
    pub field: String,
    /// What is wrong and, where possible, what would be right.
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}
