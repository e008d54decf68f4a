//! The networks: described from the config as data (`spec`), checked against
//! and bound to a state dict (`weights`), run on a backend (`run`).

pub mod load;
pub mod random;
pub mod run;
pub mod spec;
pub mod weights;

pub use load::{load_net, random_net};
pub use run::Net;
pub use spec::{NetKind, NetSpec};
