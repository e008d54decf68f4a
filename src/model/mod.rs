//! The networks: described from the config as data (`spec`), checked against
//! and bound to a state dict (`weights`), run on a backend (`run`).

pub mod random;
pub mod run;
pub mod spec;
pub mod weights;

pub use run::Net;
pub use spec::{NetKind, NetSpec};
