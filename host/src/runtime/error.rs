//! Errors of the guest runtime: what went wrong when loading or calling a guest.

use std::fmt;

/// Why a module could not be loaded (compiled, validated, linked). Deterministic: the same bytes
/// fail the same way on every node with the same engine.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not WebAssembly at all.
    #[error("not a WebAssembly file (it does not start with the \\0asm magic)")]
    NotWasm,
    /// A core module was given where a component is needed.
    #[error(
        "this is a core WebAssembly module, not a component; build the guest for the \
         wasm32-wasip2 target (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule,
    /// The component is malformed or uses features the engine has switched off.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// The component does not export the `waft:fsm/state-machine` interface waft calls.
    #[error("{0}")]
    WrongWorld(String),
    /// The component imports something waft does not provide.
    #[error("{0}")]
    UnsupportedImport(String),
    /// The module is larger than the configured cap.
    #[error("module is {size} bytes, over the {max}-byte limit")]
    TooLarge {
        /// Size of the module, in bytes.
        size: usize,
        /// The configured cap.
        max: usize,
    },
    /// Creating the instance failed (for example its start-up code trapped).
    #[error("cannot instantiate the guest: {0}")]
    Instantiate(String),
    /// The compiled-artifact cache could not be read or written.
    #[error("compiled-module cache: {0}")]
    Cache(String),
}

/// What made a guest call trap. The effects of a trapped call are always rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapKind {
    /// The call used all the fuel it was given (an endless loop, or simply too much work).
    OutOfFuel,
    /// The guest tried to grow its memory or tables past the configured limit.
    OutOfMemory,
    /// The guest panicked or executed `unreachable`.
    Panic,
    /// The reply was larger than the configured cap.
    ReplyTooLarge,
    /// Host code the call reached (a WASI function, waft's bindings) failed: a bug of the
    /// host's, contained to the call (see `runtime/contain.rs`), not the guest's doing.
    HostFault,
    /// Any other trap (stack overflow, bad memory access, a host error).
    Other,
}

impl fmt::Display for TrapKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrapKind::OutOfFuel => "ran out of fuel",
            TrapKind::OutOfMemory => "exceeded its memory limit",
            TrapKind::Panic => "panicked",
            TrapKind::ReplyTooLarge => "returned a reply over the size limit",
            TrapKind::HostFault => "call hit a host fault",
            TrapKind::Other => "trapped",
        })
    }
}

/// The failure of one guest call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestError {
    /// The guest answered `err`: it rejected the command, query or snapshot. A normal,
    /// deterministic outcome; the guest promises its state is unchanged.
    #[error("{0}")]
    Rejected(String),
    /// The call trapped. The host rolled back every effect of the call, so the guest's state is
    /// as it was before the call.
    #[error("guest {kind}: {detail}")]
    Trap {
        /// What kind of trap it was.
        kind: TrapKind,
        /// The trap message, with the tail of the guest's stderr when it printed one (a Rust
        /// panic message, for instance).
        detail: String,
    },
    /// The host refused what the call did (timers or events over a cap) and undid it, as it
    /// undoes a trap: the guest's state is as it was before the call.
    #[error("refused: {0}")]
    Refused(String),
    /// The guest could not be brought back to its pre-call state after a trap (its checkpoint
    /// or the replay of later entries failed). The instance is unusable; the caller must stop
    /// applying entries to it and report the service as failed.
    #[error("guest is broken and cannot recover: {0}")]
    Poisoned(String),
}

impl GuestError {
    /// Whether the call was rolled back by the host (a trap) rather than answered by the guest.
    pub fn is_trap(&self) -> bool {
        matches!(self, GuestError::Trap { .. })
    }
}

/// Why a guest could not be opened with a state.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The module could not be instantiated.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The guest refused or trapped on the state.
    #[error(transparent)]
    Guest(#[from] GuestError),
}

impl From<OpenError> for GuestError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Load(l) => GuestError::Poisoned(l.to_string()),
            OpenError::Guest(g) => g,
        }
    }
}
