//! numpy arrays in and out: the accepted dtypes and shapes, and the engine's layouts.

use crate::error;
use fcd::io::volume::Volume;
use fcd::tensor::Tensor;
use numpy::ndarray::{ArrayD, ArrayViewD, IxDyn, ShapeBuilder};
use numpy::{
    AllowTypeChange, Element, IntoPyArray, PyArrayDyn, PyArrayLike2, PyArrayLikeDyn,
    PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::prelude::*;

/// The order values are taken in: C (last axis fastest, slices) or Fortran (first axis
/// fastest, the engine's volumes: index `x + nx * (y + ny * z)`).
#[derive(Clone, Copy)]
enum Order {
    C,
    Fortran,
}

/// The most values one array argument may hold: 2^30, 4 GiB as float32. Checked from the
/// shape, before anything is copied, so that a huge view (a zero-stride `as_strided` of one
/// float, say) is refused rather than copied.
const MAX_VALUES: usize = 1 << 30;

/// Slices `(H, W)`, `(B, H, W)` or `(B, 1, H, W)` with `H = W = size`, float32 or float64,
/// as the engine's `[B, H, W, 1]`.
pub fn slices(obj: &Bound<'_, PyAny>, what: &str, size: usize) -> PyResult<Tensor> {
    let shape = checked_shape(obj, what, |shape| {
        let (b, h, w) = match *shape {
            [h, w] => (1, h, w),
            [b, h, w] | [b, 1, h, w] => (b, h, w),
            _ => return Err("expected (H, W), (B, H, W) or (B, 1, H, W)".to_string()),
        };
        if (h, w) != (size, size) {
            return Err(format!(
                "expected slices of {size} x {size} (the engine's image_size)"
            ));
        }
        Ok(vec![b, h, w, 1])
    })?;
    let (_, data) = floats(obj, what, Order::C)?;
    Tensor::new(shape, data).map_err(crate::engine_error)
}

/// A volume `(x, y, z)`, float32 or float64, named `what` in messages.
pub fn volume(obj: &Bound<'_, PyAny>, what: &str, affine: [[f64; 4]; 4]) -> PyResult<Volume> {
    checked_shape(obj, what, volume_shape)?;
    let (shape, data) = floats(obj, what, Order::Fortran)?;
    on_grid(shape, data, what, affine)
}

/// A volume's shape, `(x, y, z)`.
fn volume_shape(shape: &[usize]) -> Result<Vec<usize>, String> {
    match shape {
        [_, _, _] => Ok(shape.to_vec()),
        _ => Err("expected a volume (x, y, z)".to_string()),
    }
}

/// The shape `accept` makes of a numpy array's shape, refused (in one line naming `what`)
/// when `accept` refuses it or it holds more than [`MAX_VALUES`], before any copy. Objects
/// that are not numpy arrays pass through (their conversion says what is wrong with them).
fn checked_shape(
    obj: &Bound<'_, PyAny>,
    what: &str,
    accept: impl Fn(&[usize]) -> Result<Vec<usize>, String>,
) -> PyResult<Vec<usize>> {
    let Ok(a) = obj.cast::<PyUntypedArray>() else {
        return Ok(Vec::new());
    };
    let shape = a.shape();
    let n = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if n.is_none_or(|n| n > MAX_VALUES) {
        return Err(error(format!(
            "{what}: an array of shape {} holds more than {MAX_VALUES} values",
            tuple(shape)
        )));
    }
    accept(shape).map_err(|why| error(format!("{what}: an array of shape {}; {why}", tuple(shape))))
}

/// A lesion mask `(x, y, z)` of any numeric or boolean dtype (`> 0` is lesion).
pub fn mask(obj: &Bound<'_, PyAny>, affine: [[f64; 4]; 4]) -> PyResult<Volume> {
    checked_shape(obj, "mask", volume_shape)?;
    let m: PyArrayLikeDyn<'_, f32, AllowTypeChange> = obj.extract().map_err(|_| {
        error(format!(
            "mask: expected a numeric numpy array, got {}",
            describe(obj)
        ))
    })?;
    let shape = m.shape().to_vec();
    on_grid(
        shape,
        values(m.as_array(), Order::Fortran, |v| v),
        "mask",
        affine,
    )
}

/// A 4 x 4 voxel-to-world affine (`img.affine` in nibabel).
pub fn affine(obj: &Bound<'_, PyAny>) -> PyResult<[[f64; 4]; 4]> {
    let a: PyArrayLike2<'_, f64, AllowTypeChange> = obj.extract().map_err(|_| {
        error(format!(
            "affine: expected a 4 x 4 array of numbers, got {}",
            describe(obj)
        ))
    })?;
    let a = a.as_array();
    if a.shape() != [4, 4] {
        return Err(error(format!(
            "affine: an array of shape {}; expected (4, 4)",
            tuple(a.shape())
        )));
    }
    Ok(std::array::from_fn(|i| std::array::from_fn(|j| a[[i, j]])))
}

/// A float32 array of `shape` from values in C order.
pub fn c_array(py: Python<'_>, shape: &[usize], data: Vec<f32>) -> PyResult<Py<PyArrayDyn<f32>>> {
    let a =
        ArrayD::from_shape_vec(IxDyn(shape), data).map_err(|e| error(format!("internal: {e}")))?;
    Ok(a.into_pyarray(py).unbind())
}

/// A float32 array `(x, y, z)` of a volume's values.
pub fn volume_array(py: Python<'_>, v: Volume) -> PyResult<Py<PyArrayDyn<f32>>> {
    let a = ArrayD::from_shape_vec(IxDyn(&v.dims).f(), v.data)
        .map_err(|e| error(format!("internal: {e}")))?;
    Ok(a.into_pyarray(py).unbind())
}

fn on_grid(
    shape: Vec<usize>,
    data: Vec<f32>,
    what: &str,
    affine: [[f64; 4]; 4],
) -> PyResult<Volume> {
    let [nx, ny, nz] = *shape.as_slice() else {
        return Err(error(format!(
            "{what}: an array of shape {}; expected a volume (x, y, z)",
            tuple(&shape)
        )));
    };
    Ok(Volume {
        dims: [nx, ny, nz],
        data,
        affine,
        path: what.into(),
    })
}

/// The shape and values of a float32 or float64 array, in `order`.
fn floats(obj: &Bound<'_, PyAny>, what: &str, order: Order) -> PyResult<(Vec<usize>, Vec<f32>)> {
    if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'_, f32>>() {
        let a = a.as_array();
        return Ok((a.shape().to_vec(), values(a, order, |v| v)));
    }
    if let Ok(a) = obj.extract::<PyReadonlyArrayDyn<'_, f64>>() {
        let a = a.as_array();
        // The rounding `fcd detect` applies to a float64 .npy file.
        return Ok((a.shape().to_vec(), values(a, order, |v| v as f32)));
    }
    Err(error(format!(
        "{what}: expected a float32 or float64 numpy array, got {}",
        describe(obj)
    )))
}

fn values<T: Element + Copy>(a: ArrayViewD<'_, T>, order: Order, f: impl Fn(T) -> f32) -> Vec<f32> {
    match order {
        Order::C => a.iter().map(|&v| f(v)).collect(),
        Order::Fortran => a.reversed_axes().iter().map(|&v| f(v)).collect(),
    }
}

/// What a refused argument is, for messages: an array's dtype and shape, else its type.
fn describe(obj: &Bound<'_, PyAny>) -> String {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) => format!(
            "an array of dtype {} and shape {}",
            a.dtype(),
            tuple(a.shape())
        ),
        Err(_) => match obj.get_type().name() {
            Ok(name) => format!("a {name}"),
            Err(_) => "an object of unknown type".to_string(),
        },
    }
}

/// A shape as Python writes it: `(2, 32, 32)`, `(32,)`.
fn tuple(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => {
            let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            format!("({})", dims.join(", "))
        }
    }
}
