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
//! until the guard drops.
//!
//! The other lmig crates log through the same machinery: the macros are
//! exported under hidden names (`__lmig_debug!`, …) and each crate's own
//! `log.rs` only names them, so that `debug!`/`warn!`/… read the same in
//! every crate. Whether they log is decided here, by lmig-core's feature
//! `tracing` (each crate's `tracing` feature turns it on).

#![allow(unused_macros, unused_imports, dead_code)]

/// Logs at DEBUG: what a cleanup dropped, steps that are routine.
#[cfg(feature = "tracing")]
#[doc(hidden)]
#[macro_export]
macro_rules! __lmig_debug {
    ($($t:tt)*) => { $crate::log::tracing::debug!($($t)*) };
}
/// Logs at INFO: phases, decisions, the tracker chosen.
#[cfg(feature = "tracing")]
#[doc(hidden)]
#[macro_export]
macro_rules! __lmig_info {
    ($($t:tt)*) => { $crate::log::tracing::info!($($t)*) };
}
/// Logs at WARN: something went wrong without failing the migration.
#[cfg(feature = "tracing")]
#[doc(hidden)]
#[macro_export]
macro_rules! __lmig_warn {
    ($($t:tt)*) => { $crate::log::tracing::warn!($($t)*) };
}
/// Logs at ERROR: the migration failed.
#[cfg(feature = "tracing")]
#[doc(hidden)]
#[macro_export]
macro_rules! __lmig_error {
    ($($t:tt)*) => { $crate::log::tracing::error!($($t)*) };
}
/// An INFO span entered until the returned [`PhaseSpan`] drops.
#[cfg(feature = "tracing")]
#[doc(hidden)]
#[macro_export]
macro_rules! __lmig_phase_span {
    ($name:literal $(, $($t:tt)*)?) => {
        $crate::log::PhaseSpan($crate::log::tracing::info_span!($name $(, $($t)*)?).entered())
    };
}

#[cfg(not(feature = "tracing"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __lmig_debug {
    ($($t:tt)*) => { if false { $crate::__lmig_touch!($($t)*); } };
}
#[cfg(not(feature = "tracing"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __lmig_info {
    ($($t:tt)*) => { if false { $crate::__lmig_touch!($($t)*); } };
}
#[cfg(not(feature = "tracing"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __lmig_warn {
    ($($t:tt)*) => { if false { $crate::__lmig_touch!($($t)*); } };
}
#[cfg(not(feature = "tracing"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __lmig_error {
    ($($t:tt)*) => { if false { $crate::__lmig_touch!($($t)*); } };
}
#[cfg(not(feature = "tracing"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __lmig_phase_span {
    ($name:literal $(, $($t:tt)*)?) => {{
        if false {
            $crate::__lmig_touch!($($($t)*)?);
        }
        $crate::log::PhaseSpan
    }};
}

/// The crate's names for the exported macros (each lmig crate's `log.rs`
/// has these lines with `::lmig_core` for `$crate`).
macro_rules! debug { ($($t:tt)*) => { $crate::__lmig_debug!($($t)*) }; }
macro_rules! info { ($($t:tt)*) => { $crate::__lmig_info!($($t)*) }; }
macro_rules! warn { ($($t:tt)*) => { $crate::__lmig_warn!($($t)*) }; }
macro_rules! error { ($($t:tt)*) => { $crate::__lmig_error!($($t)*) }; }
macro_rules! phase_span { ($($t:tt)*) => { $crate::__lmig_phase_span!($($t)*) }; }

/// Without `tracing`: borrows every field value and formats nothing, in
/// dead code (the type checker sees the arguments, nothing runs).
#[doc(hidden)]
#[macro_export]
macro_rules! __lmig_touch {
    () => {};
    ($k:ident = % $v:expr $(, $($rest:tt)*)?) => {
        $crate::log::unused(&$v);
        $($crate::__lmig_touch!($($rest)*);)?
    };
    ($k:ident = ? $v:expr $(, $($rest:tt)*)?) => {
        $crate::log::unused(&$v);
        $($crate::__lmig_touch!($($rest)*);)?
    };
    ($k:ident = $v:expr $(, $($rest:tt)*)?) => {
        $crate::log::unused(&$v);
        $($crate::__lmig_touch!($($rest)*);)?
    };
    // tracing's shorthands: `cpu`, `%cpu`, `?cpu` name a field after a
    // variable.
    (% $k:ident $(, $($rest:tt)*)?) => {
        $crate::log::unused(&$k);
        $($crate::__lmig_touch!($($rest)*);)?
    };
    (? $k:ident $(, $($rest:tt)*)?) => {
        $crate::log::unused(&$k);
        $($crate::__lmig_touch!($($rest)*);)?
    };
    ($k:ident $(, $($rest:tt)*)?) => {
        $crate::log::unused(&$k);
        $($crate::__lmig_touch!($($rest)*);)?
    };
    ($fmt:literal $(, $a:expr)* $(,)?) => {
        $crate::log::unused(&format_args!($fmt $(, $a)*));
    };
}

// `warn` cannot be imported by `use` (it is also a built-in attribute):
// the crate root declares this module first with `#[macro_use]`, which
// puts every macro here in scope below it.

/// `tracing`, for the exported macros' expansions in other crates.
#[cfg(feature = "tracing")]
pub use ::tracing;

/// Takes a value and does nothing with it (the log without `tracing`).
#[inline(always)]
pub fn unused<T: ?Sized>(_: &T) {}

/// A phase's span, entered until dropped (nothing without `tracing`).
#[cfg(feature = "tracing")]
#[must_use = "the span ends when the guard drops: bind it to a named variable"]
pub struct PhaseSpan(pub ::tracing::span::EnteredSpan);

/// A phase's span, entered until dropped (nothing without `tracing`).
#[cfg(not(feature = "tracing"))]
#[must_use = "the span ends when the guard drops: bind it to a named variable"]
pub struct PhaseSpan;

/// The caller's subscriber and span, carried to a thread the session
/// starts so that its events land where the caller's do (nothing without
/// `tracing`).
#[cfg(feature = "tracing")]
pub struct Inherit {
    dispatch: ::tracing::Dispatch,
    span: ::tracing::Span,
}

#[cfg(feature = "tracing")]
impl Inherit {
    /// The current thread's subscriber and span.
    pub fn capture() -> Self {
        Self {
            dispatch: ::tracing::dispatcher::get_default(|d| d.clone()),
            span: ::tracing::Span::current(),
        }
    }

    /// Run `f` with them (on the new thread).
    pub fn run<T>(self, f: impl FnOnce() -> T) -> T {
        ::tracing::dispatcher::with_default(&self.dispatch, || self.span.in_scope(f))
    }
}

/// The caller's subscriber and span, carried to a thread the session
/// starts (nothing without `tracing`).
#[cfg(not(feature = "tracing"))]
pub struct Inherit;

#[cfg(not(feature = "tracing"))]
impl Inherit {
    /// Nothing to capture.
    pub fn capture() -> Self {
        Self
    }

    /// Run `f`.
    pub fn run<T>(self, f: impl FnOnce() -> T) -> T {
        f()
    }
}
