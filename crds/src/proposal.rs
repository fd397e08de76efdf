//! Proposal strings in strongSwan's syntax, parsed into the algorithms the gateway implements
//! (`concentrator-algorithms`, a crate below the CRDs that the IKE engine shares).

pub use concentrator_algorithms::*;

impl From<ProposalError> for crate::ValidationError {
    fn from(e: ProposalError) -> Self {
        Self::new(e.field, e.message)
    }
}
