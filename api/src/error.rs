//! What can go wrong turning wire messages into the typed values both sides
//! act on.

/// A wire entry that does not make sense. The text names the object and
/// the field (in the CRD's spelling, so an operator finds it) and the
/// problem; it is what an object's `Invalid` status and a proxy's NACK say.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Compiling an AuthorizationPolicy failed.
    #[error("AuthorizationPolicy {policy}: {field}: {problem}")]
    InvalidAuthorizationPolicy {
        /// `<namespace>/<name>`.
        policy: String,
        /// The field at fault.
        field: String,
        /// What is wrong with its value.
        problem: String,
    },
    /// A part of a config update that does not continue the update before
    /// it (see [`crate::parts`]).
    #[error(
        "config update part (version {part_version}, full state {part_full_state}) does not \
         continue the update in progress (version {version}, full state {full_state})"
    )]
    PartOutOfPlace {
        /// The update in progress.
        version: u64,
        /// Whether it is a full state.
        full_state: bool,
        /// The part's version.
        part_version: u64,
        /// Whether the part says full state.
        part_full_state: bool,
    },
    /// A message that does not decode.
    #[error("undecodable message: {0}")]
    Undecodable(String),
    /// An update whose parts together exceed the limit.
    #[error("config update {version} is {bytes} bytes so far, over the limit of {limit}")]
    UpdateTooLarge {
        /// Its version.
        version: u64,
        /// Its size so far.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// Converting a TrafficPolicy failed.
    #[error("TrafficPolicy {policy}: {field}: {problem}")]
    InvalidTrafficPolicy {
        /// `<namespace>/<name>`.
        policy: String,
        /// The field at fault.
        field: String,
        /// What is wrong with its value.
        problem: String,
    },
}

impl Error {
    /// The field and the problem, without the object's name: what an
    /// object's own status says about it (`outlierDetection.baseEjectionTime:
    /// must be longer than 0s`).
    pub fn field_problem(&self) -> String {
        match self {
            Error::InvalidAuthorizationPolicy { field, problem, .. }
            | Error::InvalidTrafficPolicy { field, problem, .. } => format!("{field}: {problem}"),
            other => other.to_string(),
        }
    }
}
