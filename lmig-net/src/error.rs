//! [`NetError`]: everything lmig-net can fail with.

use std::io;

use lmig_core::MigrationError;

/// A failure of socket capture, restore or test topology.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// A kernel operation failed on one socket.
    #[error("{op} failed on {what}: {source}")]
    Sys {
        /// The kernel operation, e.g. `"TCP_REPAIR on"`.
        op: &'static str,
        /// The socket it was applied to, e.g. `"TCP connection 7 (...)"`.
        what: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    /// A kernel feature is missing (found by probing, never by a panic).
    #[error("{feature} is not supported here: needs {needs}")]
    Unsupported {
        /// The missing feature, e.g. `"TCP_REPAIR"`.
        feature: &'static str,
        /// What provides it, e.g. `"CAP_NET_ADMIN in the socket's network namespace"`.
        needs: &'static str,
    },

    /// The socket is in a state lmig cannot move; nothing was changed.
    #[error("{what} cannot be migrated: {reason}")]
    NotMigratable {
        /// The socket.
        what: String,
        /// Why, in words.
        reason: String,
    },

    /// The connection was reset or closed by the peer before the capture
    /// (TCP state `CLOSE`): there is nothing left to move. Capture skips it
    /// ([`crate::NetSource::gone`] lists it) instead of failing.
    #[error("{what} is gone: the peer reset or closed it before the capture")]
    ConnectionGone {
        /// The connection's id and addresses.
        what: String,
    },

    /// A record was rejected before anything was restored from it.
    #[error(transparent)]
    InvalidRecord(MigrationError),

    /// Some sockets of a batch failed; the others were restored.
    #[error("{} of {total} sockets failed, first: {}", failures.len(), failures.first().map(|f| f.to_string()).unwrap_or_default())]
    Partial {
        /// Sockets in the batch.
        total: usize,
        /// One entry per failed socket (its id and error).
        failures: Vec<SocketFailure>,
    },

    /// An id was given twice, or a record names a socket that was not prepared as its kind.
    #[error("socket id {id}: {detail}")]
    BadId {
        /// The id.
        id: u64,
        /// What is wrong.
        detail: &'static str,
    },

    /// The operation is not allowed in the current phase (e.g. capture before freeze).
    #[error("{op} is not allowed now: {detail}")]
    Phase {
        /// The operation.
        op: &'static str,
        /// Why not.
        detail: &'static str,
    },

    /// The migration channel would run over a service address being moved:
    /// the network lock would hold the channel's own packets at the freeze
    /// (the freeze then lasts until a timeout). Use another address for the
    /// channel (e.g. the host's own address on the link).
    #[error(
        "the migration channel's {end} address {addr} is the service address {service} being moved"
    )]
    ChannelOnServiceAddress {
        /// Which end of the channel: `"local"` or `"peer"`.
        end: &'static str,
        /// The channel's address at that end.
        addr: std::net::SocketAddr,
        /// The service address it uses.
        service: std::net::IpAddr,
    },

    /// Test-topology setup or teardown failed.
    #[error("topology: {detail}")]
    Topology {
        /// What failed.
        detail: String,
        /// The underlying error, if any.
        #[source]
        source: Option<io::Error>,
    },
}

/// One failed socket in a batch.
#[derive(Debug, thiserror::Error)]
#[error("socket {id}: {error}")]
pub struct SocketFailure {
    /// The program's id of the socket.
    pub id: u64,
    /// What failed.
    #[source]
    pub error: Box<NetError>,
}

impl NetError {
    /// A failed kernel operation on `what`.
    pub fn sys(op: &'static str, what: impl Into<String>, source: io::Error) -> Self {
        Self::Sys {
            op,
            what: what.into(),
            source,
        }
    }

    /// A topology error with an optional cause.
    pub fn topology(detail: impl Into<String>, source: Option<io::Error>) -> Self {
        Self::Topology {
            detail: detail.into(),
            source,
        }
    }
}

impl From<NetError> for MigrationError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::InvalidRecord(inner) => inner,
            NetError::Unsupported { feature, needs } => {
                MigrationError::Unsupported { feature, needs }
            }
            other => MigrationError::backend("lmig-net sockets", other),
        }
    }
}

/// Result alias of lmig-net.
pub type Result<T, E = NetError> = std::result::Result<T, E>;
