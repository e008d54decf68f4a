//! Status codes, the thread-local last error, and the guard that keeps errors and panics on
//! the Rust side of the boundary.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{self, AssertUnwindSafe};

/// What an fcd call returned.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FcdStatus {
    Ok = 0,
    /// The engine refused: an unreadable file, bad input values, an unusable device, ...
    Error = 1,
    /// A NULL pointer, a non-UTF-8 string, an unknown device or precision, an empty size.
    InvalidArgument = 2,
    /// A bug in fcd (a Rust panic), stopped at the boundary.
    Panic = 3,
}

/// Why a call failed: the caller's arguments, or the engine.
pub(crate) enum Failure {
    Invalid(String),
    Engine(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Engine(e)
    }
}

pub(crate) fn invalid(message: impl Into<String>) -> Failure {
    Failure::Invalid(message.into())
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// The message of the calling thread's last fcd call: one line saying why it failed, empty
/// when it succeeded. Valid until this thread's next fcd call; never NULL.
#[no_mangle]
pub extern "C" fn fcd_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Runs one entry point's `body`, recording its outcome for `fcd_last_error`.
pub(crate) fn call(body: impl FnOnce() -> Result<(), Failure>) -> FcdStatus {
    let (status, message) = match panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => (FcdStatus::Ok, String::new()),
        Ok(Err(Failure::Invalid(m))) => (FcdStatus::InvalidArgument, m),
        Ok(Err(Failure::Engine(e))) => (FcdStatus::Error, format!("{e:#}")),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            (
                FcdStatus::Panic,
                format!("internal error in fcd (a panic): {what}"),
            )
        }
    };
    // A message is one line of text; a NUL inside would cut it short in C.
    let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = message);
    status
}
