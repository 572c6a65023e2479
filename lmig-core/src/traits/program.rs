//! The program's own side: pause, state, throttle, resume.

use crate::error::Result;
use crate::model::ProgramState;

/// The running program on the source: how to pause it and take its own state.
pub trait StateSource: Send {
    /// Stop the program from touching its memory and sockets (the freeze begins).
    fn pause(&mut self) -> Result<()>;

    /// The program's own state, taken while paused.
    fn capture(&mut self) -> Result<ProgramState> {
        Ok(ProgramState::default())
    }

    /// The migration failed before `Commit`: let the program continue here.
    fn resume(&mut self) -> Result<()>;

    /// Pre-copy does not converge: slow the program's writes down to
    /// `percent` of their rate, if it can. Return false if it cannot.
    fn throttle(&mut self, percent: u8) -> bool {
        let _ = percent;
        false
    }

    /// `Commit` was sent: the program must never run here again.
    fn committed(&mut self) {}
}

/// The program on the destination: how to hand its state back and start it.
///
/// Order: `restore` (in the freeze, before `Ready`; refusing fails the
/// attempt), then `resume` at `Commit` right after the sockets were
/// activated — the sink then goes back to the program in the
/// [`Resumption`](crate::session::Resumption) — or `discard` if the attempt
/// failed. See [the module docs](crate::traits).
pub trait StateSink: Send {
    /// Take the program's state (called before `Ready`; may refuse an unknown version).
    fn restore(&mut self, state: ProgramState) -> Result<()> {
        let _ = state;
        Ok(())
    }

    /// After `Commit`: start the program.
    fn resume(&mut self) -> Result<()>;

    /// The migration failed before `Commit`: forget the state.
    fn discard(&mut self) {}
}
