use bytes::Bytes;

use crate::error::{MigrationError, Result};

/// Largest program state blob accepted from a peer (256 MiB).
pub const MAX_STATE_BYTES: usize = 256 << 20;

/// The program's own state, opaque to lmig, taken at the freeze and handed
/// back at resume. `version` is the program's format version: a destination
/// that does not know it refuses the migration before the commit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgramState {
    /// The program's format version of `data`.
    pub version: u32,
    /// The serialized state.
    pub data: Bytes,
}

impl ProgramState {
    /// A state blob.
    pub fn new(version: u32, data: impl Into<Bytes>) -> Self {
        Self {
            version,
            data: data.into(),
        }
    }

    /// Check the size cap.
    pub fn validate(&self) -> Result<()> {
        if self.data.len() > MAX_STATE_BYTES {
            return Err(MigrationError::invalid(
                "program state",
                format!(
                    "{} bytes exceeds the cap of {MAX_STATE_BYTES}",
                    self.data.len()
                ),
            ));
        }
        Ok(())
    }
}
