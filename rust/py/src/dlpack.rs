//! Zero-copy hand-over of entry tensors to torch through DLPack capsules.
//!
//! DLPack is the one exchange format that works under the stable ABI (abi3) and carries bfloat16.
//! Each capsule owns an `Arc` of the entry's bytes (a private mapping or an aligned buffer): the
//! mapping lives exactly as long as the last tensor viewing it.

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use featstore_core::entry::{Dtype, EntryBytes, TensorInfo};
use pyo3::prelude::*;
use pyo3::{ffi, PyErr};

const DLTENSOR: &CStr = c"dltensor";

#[repr(C)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// The managed tensor plus what it points into; `managed` must stay the first field so a
/// `*mut DLManagedTensor` is also a `*mut Owned`.
#[repr(C)]
struct Owned {
    managed: DLManagedTensor,
    shape: Vec<i64>,
    strides: Vec<i64>,
    _bytes: Arc<EntryBytes>,
}

const K_DL_CPU: i32 = 1;
const K_DL_INT: u8 = 0;
const K_DL_UINT: u8 = 1;
const K_DL_FLOAT: u8 = 2;
const K_DL_BFLOAT: u8 = 4;
const K_DL_BOOL: u8 = 6;

fn dl_dtype(d: Dtype) -> Option<DLDataType> {
    let (code, bits) = match d {
        Dtype::Bool => (K_DL_BOOL, 8),
        Dtype::U8 => (K_DL_UINT, 8),
        Dtype::U16 => (K_DL_UINT, 16),
        Dtype::U32 => (K_DL_UINT, 32),
        Dtype::U64 => (K_DL_UINT, 64),
        Dtype::I8 => (K_DL_INT, 8),
        Dtype::I16 => (K_DL_INT, 16),
        Dtype::I32 => (K_DL_INT, 32),
        Dtype::I64 => (K_DL_INT, 64),
        Dtype::F16 => (K_DL_FLOAT, 16),
        Dtype::F32 => (K_DL_FLOAT, 32),
        Dtype::F64 => (K_DL_FLOAT, 64),
        Dtype::BF16 => (K_DL_BFLOAT, 16),
        // DLPack codes for float8 are too new for the torch versions featstore supports.
        Dtype::F8E4M3 | Dtype::F8E5M2 => return None,
    };
    Some(DLDataType {
        code,
        bits,
        lanes: 1,
    })
}

unsafe extern "C" fn delete_owned(managed: *mut DLManagedTensor) {
    // SAFETY: every DLManagedTensor we hand out is the first field of a Box<Owned> leaked in
    // `capsule`; the consumer calls the deleter exactly once.
    unsafe { drop(Box::from_raw(managed as *mut Owned)) }
}

unsafe extern "C" fn capsule_destructor(capsule: *mut ffi::PyObject) {
    // SAFETY: called by Python with our capsule. A consumer renames it to "used_dltensor" and
    // takes over the deleter; only an unconsumed capsule still owns the tensor.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, DLTENSOR.as_ptr()) == 1 {
            let managed =
                ffi::PyCapsule_GetPointer(capsule, DLTENSOR.as_ptr()) as *mut DLManagedTensor;
            if let Some(deleter) = (*managed).deleter {
                deleter(managed);
            }
        }
    }
}

/// A `"dltensor"` capsule viewing tensor `t` of an entry whose data section starts at `data_start`.
pub fn capsule<'py>(
    py: Python<'py>,
    bytes: &Arc<EntryBytes>,
    data_start: u64,
    t: &TensorInfo,
) -> PyResult<Bound<'py, PyAny>> {
    // featstore never writes such a tensor, so the file came from elsewhere: a bad entry (a
    // miss for `FeatureStore.get`), not a programming error.
    let dtype = dl_dtype(t.dtype).ok_or_else(|| {
        crate::error::CorruptEntryError::new_err(format!(
            "tensor {:?} has dtype {}, which featstore never writes and torch cannot import \
             through DLPack: not a featstore entry; delete it and recompute",
            t.name,
            t.dtype.name()
        ))
    })?;
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1);
    }
    // SAFETY: data_start + t.start lies inside the validated entry bytes (parse_header checked
    // every offset against the data section's length).
    let data = unsafe { bytes.as_ptr().add((data_start + t.start) as usize) } as *mut c_void;
    let mut owned = Box::new(Owned {
        managed: DLManagedTensor {
            dl_tensor: DLTensor {
                data,
                device: DLDevice {
                    device_type: K_DL_CPU,
                    device_id: 0,
                },
                ndim: shape.len() as i32,
                dtype,
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(delete_owned),
        },
        shape,
        strides,
        _bytes: Arc::clone(bytes),
    });
    // The Vecs' heap buffers do not move when the Box is leaked.
    owned.managed.dl_tensor.shape = owned.shape.as_mut_ptr();
    owned.managed.dl_tensor.strides = owned.strides.as_mut_ptr();
    let raw = Box::into_raw(owned);
    // SAFETY: `raw` is a valid, leaked Owned whose first field is the DLManagedTensor; the
    // destructor frees it unless a consumer took it over. The name is a static C string.
    unsafe {
        (*raw).managed.manager_ctx = raw as *mut c_void;
        let cap = ffi::PyCapsule_New(
            raw as *mut c_void,
            DLTENSOR.as_ptr(),
            Some(capsule_destructor),
        );
        if cap.is_null() {
            drop(Box::from_raw(raw));
            return Err(PyErr::fetch(py));
        }
        Ok(Bound::from_owned_ptr(py, cap))
    }
}
