//! The crate's log: events and phase spans, forwarded to `tracing` with the
//! feature `tracing`, compiled to nothing without it (the arguments are
//! still type-checked, never evaluated, so a variable used only in a log
//! line is not "unused").
//!
//! The call syntax is `tracing`'s common subset: fields `key = value`,
//! `key = %display` or `key = ?debug`, then a format string and its
//! arguments (`warn!(error = %e, "closing the channel failed")`), in scope
//! in the whole crate without an import. Spans:
//! `let _phase = phase_span!("freeze", round = n);` holds the span entered
//! until the guard drops. One copy of this module lives in each lmig crate.

#![allow(unused_macros, unused_imports, dead_code)]

/// Logs at DEBUG: what a cleanup dropped, steps that are routine.
#[cfg(feature = "tracing")]
macro_rules! debug {
    ($($t:tt)*) => { ::tracing::debug!($($t)*) };
}
/// Logs at INFO: phases, decisions, the tracker chosen.
#[cfg(feature = "tracing")]
macro_rules! info {
    ($($t:tt)*) => { ::tracing::info!($($t)*) };
}
/// Logs at WARN: something went wrong without failing the migration.
#[cfg(feature = "tracing")]
macro_rules! warn {
    ($($t:tt)*) => { ::tracing::warn!($($t)*) };
}
/// Logs at ERROR: the migration failed.
#[cfg(feature = "tracing")]
macro_rules! error {
    ($($t:tt)*) => { ::tracing::error!($($t)*) };
}
/// An INFO span entered until the returned [`PhaseSpan`] drops.
#[cfg(feature = "tracing")]
macro_rules! phase_span {
    ($name:literal $(, $($t:tt)*)?) => {
        $crate::log::PhaseSpan(::tracing::info_span!($name $(, $($t)*)?).entered())
    };
}

#[cfg(not(feature = "tracing"))]
macro_rules! debug {
    ($($t:tt)*) => { if false { $crate::log::touch!($($t)*); } };
}
#[cfg(not(feature = "tracing"))]
macro_rules! info {
    ($($t:tt)*) => { if false { $crate::log::touch!($($t)*); } };
}
#[cfg(not(feature = "tracing"))]
macro_rules! warn {
    ($($t:tt)*) => { if false { $crate::log::touch!($($t)*); } };
}
#[cfg(not(feature = "tracing"))]
macro_rules! error {
    ($($t:tt)*) => { if false { $crate::log::touch!($($t)*); } };
}
#[cfg(not(feature = "tracing"))]
macro_rules! phase_span {
    ($name:literal $(, $($t:tt)*)?) => {{
        if false {
            $crate::log::touch!($($($t)*)?);
        }
        $crate::log::PhaseSpan
    }};
}

/// Without `tracing`: borrows every field value and formats nothing, in
/// dead code (the type checker sees the arguments, nothing runs).
macro_rules! touch {
    () => {};
    ($k:ident = % $v:expr $(, $($rest:tt)*)?) => {
        $crate::log::unused(&$v);
        $($crate::log::touch!($($rest)*);)?
    };
    ($k:ident = ? $v:expr $(, $($rest:tt)*)?) => {
        $crate::log::unused(&$v);
        $($crate::log::touch!($($rest)*);)?
    };
    ($k:ident = $v:expr $(, $($rest:tt)*)?) => {
        $crate::log::unused(&$v);
        $($crate::log::touch!($($rest)*);)?
    };
    ($fmt:literal $(, $a:expr)* $(,)?) => {
        $crate::log::unused(&format_args!($fmt $(, $a)*));
    };
}

// `warn` cannot be imported by `use` (it is also a built-in attribute):
// the crate root declares this module first with `#[macro_use]`, which
// puts every macro here in scope below it; `touch` is also reachable by path.
pub(crate) use touch;

/// Takes a value and does nothing with it (the log without `tracing`).
#[inline(always)]
pub(crate) fn unused<T: ?Sized>(_: &T) {}

/// A phase's span, entered until dropped (nothing without `tracing`).
#[cfg(feature = "tracing")]
#[must_use = "the span ends when the guard drops: bind it to a named variable"]
pub(crate) struct PhaseSpan(pub(crate) ::tracing::span::EnteredSpan);

/// A phase's span, entered until dropped (nothing without `tracing`).
#[cfg(not(feature = "tracing"))]
#[must_use = "the span ends when the guard drops: bind it to a named variable"]
pub(crate) struct PhaseSpan;

/// The caller's subscriber and span, carried to a thread the session
/// starts so that its events land where the caller's do (nothing without
/// `tracing`).
#[cfg(feature = "tracing")]
pub(crate) struct Inherit {
    dispatch: ::tracing::Dispatch,
    span: ::tracing::Span,
}

#[cfg(feature = "tracing")]
impl Inherit {
    /// The current thread's subscriber and span.
    pub(crate) fn capture() -> Self {
        Self {
            dispatch: ::tracing::dispatcher::get_default(|d| d.clone()),
            span: ::tracing::Span::current(),
        }
    }

    /// Run `f` with them (on the new thread).
    pub(crate) fn run<T>(self, f: impl FnOnce() -> T) -> T {
        ::tracing::dispatcher::with_default(&self.dispatch, || self.span.in_scope(f))
    }
}

/// The caller's subscriber and span, carried to a thread the session
/// starts (nothing without `tracing`).
#[cfg(not(feature = "tracing"))]
pub(crate) struct Inherit;

#[cfg(not(feature = "tracing"))]
impl Inherit {
    /// Nothing to capture.
    pub(crate) fn capture() -> Self {
        Self
    }

    /// Run `f`.
    pub(crate) fn run<T>(self, f: impl FnOnce() -> T) -> T {
        f()
    }
}
