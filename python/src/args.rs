//! Python arguments taken as objects and converted here, so that every bad one (a wrong
//! type, None where a value is needed, an integer out of range) raises `FcdError` naming the
//! argument, not a `TypeError` or `OverflowError` from the binding layer.

use crate::error;
use pyo3::prelude::*;
use pyo3::types::PyBool;
use std::path::PathBuf;

/// What `obj` is, for messages: its type's name.
fn kind(obj: &Bound<'_, PyAny>) -> String {
    match obj.get_type().name() {
        Ok(name) => format!("a {name}"),
        Err(_) => "an object of unknown type".to_string(),
    }
}

/// A path (str or os.PathLike).
pub fn path(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<PathBuf> {
    obj.extract::<PathBuf>().map_err(|_| {
        error(format!(
            "{what}: expected a path (str or os.PathLike), got {}",
            kind(obj)
        ))
    })
}

/// A string.
pub fn string(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    obj.extract::<String>()
        .map_err(|_| error(format!("{what}: expected a str, got {}", kind(obj))))
}

/// A whole number in `min..=max` (a bool is refused: `True` is not a count).
pub fn int(obj: &Bound<'_, PyAny>, what: &str, min: u64, max: u64) -> PyResult<u64> {
    let out_of_range = || {
        error(format!(
            "{what}: {} is out of range {min}..={max}",
            obj.str()
                .map_or_else(|_| "the value".into(), |s| s.to_string())
        ))
    };
    if obj.is_instance_of::<PyBool>() {
        return Err(error(format!("{what}: expected an int, got a bool")));
    }
    let v: i128 = obj.extract().map_err(|e: PyErr| {
        if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(obj.py()) {
            out_of_range()
        } else {
            error(format!("{what}: expected an int, got {}", kind(obj)))
        }
    })?;
    u64::try_from(v)
        .ok()
        .filter(|v| (min..=max).contains(v))
        .ok_or_else(out_of_range)
}

/// [`int`] as a `usize`, within `min..=max`.
pub fn count(obj: &Bound<'_, PyAny>, what: &str, min: usize, max: usize) -> PyResult<usize> {
    Ok(int(obj, what, min as u64, max as u64)? as usize)
}

/// A real number (an int is taken as one; a bool is refused).
pub fn real(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<f64> {
    if obj.is_instance_of::<PyBool>() {
        return Err(error(format!("{what}: expected a number, got a bool")));
    }
    obj.extract::<f64>()
        .map_err(|_| error(format!("{what}: expected a number, got {}", kind(obj))))
}

/// A bool.
pub fn flag(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<bool> {
    obj.extract::<bool>()
        .map_err(|_| error(format!("{what}: expected a bool, got {}", kind(obj))))
}

/// `convert` applied to an optional argument; None (or absent) gives None.
pub fn optional<T>(
    obj: Option<&Bound<'_, PyAny>>,
    convert: impl FnOnce(&Bound<'_, PyAny>) -> PyResult<T>,
) -> PyResult<Option<T>> {
    match obj {
        Some(o) if !o.is_none() => convert(o).map(Some),
        _ => Ok(None),
    }
}
