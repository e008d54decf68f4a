//! `fcd._fcd`, the extension module behind the Python package `fcd` (python/fcd/): the
//! engine, its results, and `FcdError`. A thin layer over `fcd::engine`.

mod args;
mod arrays;
mod engine;
mod results;

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

create_exception!(
    fcd,
    FcdError,
    PyValueError,
    "Raised by fcd with the engine's one-line message: unreadable checkpoints, inputs of the \
     wrong shape or with non-finite values, an unusable device, ..."
);

/// An `FcdError` with the engine's one-line message.
fn engine_error(e: anyhow::Error) -> PyErr {
    FcdError::new_err(format!("{e:#}"))
}

fn error(message: impl Into<String>) -> PyErr {
    FcdError::new_err(message.into())
}

#[pymodule]
fn _fcd(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("FcdError", m.py().get_type::<FcdError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<engine::Engine>()?;
    m.add_class::<results::Detection>()?;
    m.add_class::<results::Peak>()?;
    m.add_class::<results::VolumeDetection>()?;
    m.add_class::<results::VolumePeak>()?;
    Ok(())
}
