//! The PyO3 bindings, and nothing else: argument conversion, the error mapping, GIL release.

use std::path::PathBuf;

use parking_lot::Mutex;
use pyo3::exceptions::{
    PyDeprecationWarning, PyException, PyLookupError, PyOSError, PyPermissionError, PyRuntimeError,
    PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyInt, PyList, PyString, PyTuple, PyType};

use crate::adapter_file::ReadError;
use crate::{
    AdapterFile, AdapterRegistry, Error, LoRARequest, NewRequest, Placement, ReadJob, Residency,
    Scheduler, SchedulerConfig, SchedulerOutput, SlotDtype, Staging, Submitter, WeightCopy,
};

/// The error kinds, each a subclass of `LoraplexError` and of a builtin, so that
/// `except ValueError` catches bad input as it would in plain Python.
struct ErrorTypes {
    root: Py<PyType>,
    invalid_lora_request: Py<PyType>,
    adapter_conflict: Py<PyType>,
    unknown_adapter: Py<PyType>,
    no_free_slot: Py<PyType>,
    adapter_in_use: Py<PyType>,
    adapter_not_loaded: Py<PyType>,
    queue_full: Py<PyType>,
    duplicate_request: Py<PyType>,
    invalid_request: Py<PyType>,
    invalid_config: Py<PyType>,
}

static ERROR_TYPES: PyOnceLock<ErrorTypes> = PyOnceLock::new();

fn error_type<'py>(
    py: Python<'py>,
    name: &str,
    bases: &[&Bound<'py, PyType>],
    doc: &str,
) -> PyResult<Py<PyType>> {
    let bases = PyTuple::new(py, bases)?;
    let ns = PyDict::new(py);
    ns.set_item("__module__", "loraplex._core")?;
    ns.set_item("__doc__", doc)?;
    let ty = py.get_type::<PyType>().call1((name, bases, ns))?;
    Ok(ty.cast_into::<PyType>()?.unbind())
}

fn error_types(py: Python<'_>) -> PyResult<&ErrorTypes> {
    ERROR_TYPES.get_or_try_init(py, || {
        let root = error_type(
            py,
            "LoraplexError",
            &[&py.get_type::<PyException>()],
            "Root of every loraplex error.",
        )?;
        let root_type = root.bind(py).clone();
        let kind = |name: &str, builtin: Bound<'_, PyType>, doc: &str| {
            error_type(py, name, &[&root_type, &builtin], doc)
        };
        let value = || py.get_type::<PyValueError>();
        let runtime = || py.get_type::<PyRuntimeError>();
        Ok(ErrorTypes {
            invalid_lora_request: kind(
                "InvalidLoRARequestError",
                value(),
                "A LoRARequest with an invalid id, name or path.",
            )?,
            adapter_conflict: kind(
                "AdapterConflictError",
                value(),
                "An adapter whose id, name or path clashes with a registered one.",
            )?,
            unknown_adapter: kind(
                "UnknownAdapterError",
                py.get_type::<PyLookupError>(),
                "An adapter id that is not registered.",
            )?,
            adapter_in_use: kind(
                "AdapterInUseError",
                runtime(),
                "An adapter that unfinished requests still use.",
            )?,
            adapter_not_loaded: kind(
                "AdapterNotLoadedError",
                runtime(),
                "An adapter whose weights are not in the host tier yet.",
            )?,
            no_free_slot: kind(
                "NoFreeSlotError",
                runtime(),
                "Every adapter slot is pinned or in use.",
            )?,
            queue_full: kind(
                "QueueFullError",
                runtime(),
                "The submission queue is full; retry after the engine steps.",
            )?,
            duplicate_request: kind(
                "DuplicateRequestError",
                value(),
                "A request id that is already waiting or running.",
            )?,
            invalid_request: kind(
                "InvalidRequestError",
                value(),
                "A request that cannot be scheduled as given.",
            )?,
            invalid_config: kind(
                "InvalidConfigError",
                value(),
                "Engine limits that cannot work together.",
            )?,
            root,
        })
    })
}

/// The one place a core error becomes a Python exception.
fn to_py_err(e: Error) -> PyErr {
    Python::attach(|py| {
        let types = match error_types(py) {
            Ok(t) => t,
            Err(err) => return err,
        };
        let ty = match &e {
            Error::InvalidLoraId(_)
            | Error::LoraIdOutOfRange { .. }
            | Error::EmptyLoraPath(_)
            | Error::EmptyLoraName(_) => &types.invalid_lora_request,
            Error::AdapterConflict { .. } => &types.adapter_conflict,
            Error::UnknownAdapter(_) => &types.unknown_adapter,
            Error::NoFreeSlot { .. } => &types.no_free_slot,
            Error::AdapterInUse { .. } => &types.adapter_in_use,
            Error::AdapterNotLoaded(_) => &types.adapter_not_loaded,
            Error::AdapterFailed(_) => &types.invalid_lora_request,
            Error::QueueFull { .. } => &types.queue_full,
            Error::DuplicateRequest(_) => &types.duplicate_request,
            Error::InvalidRequest { .. } => &types.invalid_request,
            Error::InvalidConfig(_) => &types.invalid_config,
        };
        PyErr::from_type(ty.bind(py).clone(), e.to_string())
    })
}

/// vLLM's `LoRARequest`: which adapter a request uses. Equality and hash by `lora_name`.
#[pyclass(name = "LoRARequest", module = "loraplex._core", frozen)]
pub struct PyLoRARequest {
    inner: LoRARequest,
    lora_local_path: Option<String>,
    tensorizer_config_dict: Option<Py<PyAny>>,
    load_inplace: bool,
}

/// A `TypeError` naming the argument `name`, what it must be, and the type it was given.
fn type_error(value: &Bound<'_, PyAny>, name: &str, must: &str) -> PyErr {
    let given = value
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default();
    PyTypeError::new_err(format!("{name} must be {must}, got {given}"))
}

/// A Python int as an adapter id; ints beyond `i64` are out of range with the culprit named.
fn lora_id(ob: &Bound<'_, PyAny>) -> PyResult<i64> {
    let int = ob
        .cast::<PyInt>()
        .map_err(|_| type_error(ob, "lora_int_id", "an int"))?;
    int.extract::<i64>().or_else(|_| {
        let bound = if int.lt(0)? {
            "> 0"
        } else {
            "<= 9223372036854775807"
        };
        Err(to_py_err(Error::LoraIdOutOfRange {
            bound,
            id: int.to_string(),
        }))
    })
}

fn path_string(p: Option<PathBuf>) -> Option<String> {
    p.map(|p| p.to_string_lossy().into_owned())
}

impl PyLoRARequest {
    #[allow(clippy::too_many_arguments)]
    fn build(
        lora_name: String,
        lora_int_id: i64,
        lora_path: String,
        lora_local_path: Option<String>,
        long_lora_max_len: Option<u64>,
        base_model_name: Option<String>,
        tensorizer_config_dict: Option<Py<PyAny>>,
        load_inplace: bool,
    ) -> PyResult<Self> {
        let lora_path = match (&lora_local_path, lora_path.is_empty()) {
            (Some(local), true) => local.clone(),
            _ => lora_path,
        };
        let inner = LoRARequest {
            lora_name,
            lora_int_id,
            lora_path,
            long_lora_max_len,
            base_model_name,
        };
        inner.validate().map_err(to_py_err)?;
        Ok(Self {
            inner,
            lora_local_path,
            tensorizer_config_dict,
            load_inplace,
        })
    }
}

#[pymethods]
impl PyLoRARequest {
    #[new]
    #[pyo3(signature = (lora_name, lora_int_id, lora_path=None, lora_local_path=None, long_lora_max_len=None, base_model_name=None, tensorizer_config_dict=None, load_inplace=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        lora_name: &Bound<'_, PyAny>,
        lora_int_id: &Bound<'_, PyAny>,
        lora_path: Option<&Bound<'_, PyAny>>,
        lora_local_path: Option<PathBuf>,
        long_lora_max_len: Option<u64>,
        base_model_name: Option<String>,
        tensorizer_config_dict: Option<Py<PyAny>>,
        load_inplace: bool,
    ) -> PyResult<Self> {
        let local = path_string(lora_local_path).filter(|p| !p.is_empty());
        if local.is_some() {
            let category = py.get_type::<PyDeprecationWarning>();
            PyErr::warn(py, &category, c"The 'lora_local_path' attribute is deprecated and will be removed in a future version. Please use 'lora_path' instead.", 1)?;
        }
        let lora_name: String = lora_name
            .extract()
            .map_err(|_| type_error(lora_name, "lora_name", "a str"))?;
        let lora_id = lora_id(lora_int_id)?;
        let lora_path = match lora_path.filter(|p| !p.is_none()) {
            Some(p) => Some(
                p.extract::<PathBuf>()
                    .map_err(|_| type_error(p, "lora_path", "a str or os.PathLike"))?,
            ),
            None => None,
        };
        let path = path_string(lora_path).unwrap_or_default();
        Self::build(
            lora_name,
            lora_id,
            path,
            local,
            long_lora_max_len,
            base_model_name,
            tensorizer_config_dict,
            load_inplace,
        )
    }

    /// A request whose id is derived from the adapter's location (see the stub's docstring).
    #[staticmethod]
    #[pyo3(signature = (path, name=None))]
    fn from_path(path: PathBuf, name: Option<String>) -> PyResult<Self> {
        let path = path.to_string_lossy().into_owned();
        let inner = LoRARequest::from_path(&path, name.as_deref()).map_err(to_py_err)?;
        Ok(Self {
            inner,
            lora_local_path: None,
            tensorizer_config_dict: None,
            load_inplace: false,
        })
    }

    #[getter]
    fn lora_name(&self) -> &str {
        &self.inner.lora_name
    }
    #[getter]
    fn lora_int_id(&self) -> i64 {
        self.inner.lora_int_id
    }
    #[getter]
    fn lora_path(&self) -> &str {
        &self.inner.lora_path
    }
    #[getter]
    fn lora_local_path(&self) -> Option<&str> {
        self.lora_local_path.as_deref()
    }
    #[getter]
    fn long_lora_max_len(&self) -> Option<u64> {
        self.inner.long_lora_max_len
    }
    #[getter]
    fn base_model_name(&self) -> Option<&str> {
        self.inner.base_model_name.as_deref()
    }
    #[getter]
    fn tensorizer_config_dict(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.tensorizer_config_dict
            .as_ref()
            .map(|d| d.clone_ref(py))
    }
    #[getter]
    fn load_inplace(&self) -> bool {
        self.load_inplace
    }
    #[getter]
    fn adapter_id(&self) -> i64 {
        self.inner.lora_int_id
    }
    #[getter]
    fn name(&self) -> &str {
        &self.inner.lora_name
    }
    #[getter]
    fn path(&self) -> &str {
        &self.inner.lora_path
    }
    /// Deprecated alias of `lora_path`, as in vLLM.
    #[getter]
    fn local_path(&self, py: Python<'_>) -> PyResult<&str> {
        let category = py.get_type::<PyDeprecationWarning>();
        PyErr::warn(py, &category, c"The 'local_path' attribute is deprecated and will be removed in a future version. Please use 'path' instead.", 1)?;
        Ok(&self.inner.lora_path)
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> Py<PyAny> {
        let py = other.py();
        match other.cast::<PyLoRARequest>() {
            Ok(o) => (o.get().inner.lora_name == self.inner.lora_name)
                .into_pyobject(py)
                .map_or_else(
                    |_| py.NotImplemented(),
                    |b| b.to_owned().into_any().unbind(),
                ),
            Err(_) => py.NotImplemented(),
        }
    }

    fn __hash__(&self, py: Python<'_>) -> PyResult<isize> {
        PyString::new(py, &self.inner.lora_name).hash()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let r = |s: &str| -> PyResult<String> { Ok(PyString::new(py, s).repr()?.to_string()) };
        let mut out = format!(
            "LoRARequest(lora_name={}, lora_int_id={}, lora_path={}",
            r(&self.inner.lora_name)?,
            self.inner.lora_int_id,
            r(&self.inner.lora_path)?
        );
        if let Some(n) = self.inner.long_lora_max_len {
            out += &format!(", long_lora_max_len={n}");
        }
        if let Some(b) = &self.inner.base_model_name {
            out += &format!(", base_model_name={}", r(b)?);
        }
        if let Some(d) = &self.tensorizer_config_dict {
            out += &format!(", tensorizer_config_dict={}", d.bind(py).repr()?);
        }
        if self.load_inplace {
            out += ", load_inplace=True";
        }
        Ok(out + ")")
    }

    fn __reduce__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let restore = py
            .import("loraplex._core")?
            .getattr("_restore_lora_request")?;
        let i = &self.inner;
        let args = (
            i.lora_name.clone(),
            i.lora_int_id,
            i.lora_path.clone(),
            self.lora_local_path.clone(),
            i.long_lora_max_len,
            i.base_model_name.clone(),
            self.tensorizer_config_dict(py),
            self.load_inplace,
        );
        Ok((restore, args.into_pyobject(py)?))
    }
}

/// Unpickling: rebuilds a request without repeating the deprecation warning.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn _restore_lora_request(
    lora_name: String,
    lora_int_id: i64,
    lora_path: String,
    lora_local_path: Option<String>,
    long_lora_max_len: Option<u64>,
    base_model_name: Option<String>,
    tensorizer_config_dict: Option<Py<PyAny>>,
    load_inplace: bool,
) -> PyResult<PyLoRARequest> {
    PyLoRARequest::build(
        lora_name,
        lora_int_id,
        lora_path,
        lora_local_path,
        long_lora_max_len,
        base_model_name,
        tensorizer_config_dict,
        load_inplace,
    )
}

fn request_to_py(inner: LoRARequest) -> PyLoRARequest {
    PyLoRARequest {
        inner,
        lora_local_path: None,
        tensorizer_config_dict: None,
        load_inplace: false,
    }
}

/// Adapter identity with id, name and path uniqueness enforced; safe across threads.
#[pyclass(name = "AdapterRegistry", module = "loraplex._core", frozen)]
pub struct PyAdapterRegistry {
    inner: AdapterRegistry,
}

#[pymethods]
impl PyAdapterRegistry {
    #[new]
    fn new() -> Self {
        Self {
            inner: AdapterRegistry::new(),
        }
    }

    fn register(&self, request: PyRef<'_, PyLoRARequest>) -> PyResult<bool> {
        self.inner.register(&request.inner).map_err(to_py_err)
    }

    fn unregister(&self, lora_int_id: i64) -> PyResult<PyLoRARequest> {
        self.inner
            .unregister(lora_int_id)
            .map(request_to_py)
            .map_err(to_py_err)
    }

    fn get(&self, lora_int_id: i64) -> Option<PyLoRARequest> {
        self.inner.get(lora_int_id).map(request_to_py)
    }

    fn get_by_name(&self, lora_name: &str) -> Option<PyLoRARequest> {
        self.inner.get_by_name(lora_name).map(request_to_py)
    }

    fn ids(&self) -> Vec<i64> {
        self.inner.ids()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, lora_int_id: i64) -> bool {
        self.inner.contains(lora_int_id)
    }
}

/// The engine's core: submissions from any thread; the step (`schedule` / `postprocess`), the
/// adapter methods and the loader pool's reports from any thread too, one at a time (a lock).
#[pyclass(name = "Scheduler", module = "loraplex._core", frozen)]
pub struct PyScheduler {
    core: Mutex<Scheduler>,
    submitter: Submitter,
    config: SchedulerConfig,
}

type ReadTuple = (i64, PyLoRARequest);

fn read_tuple(job: ReadJob) -> ReadTuple {
    (job.key, request_to_py(job.request))
}

#[pymethods]
impl PyScheduler {
    #[new]
    #[pyo3(signature = (*, max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=2048, block_size=16, num_blocks=1024, max_loras=1, max_cpu_loras=None, max_skipped_steps=32, queue_capacity=65536, max_loading=4))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        max_num_seqs: usize,
        max_num_batched_tokens: usize,
        max_model_len: usize,
        block_size: usize,
        num_blocks: usize,
        max_loras: usize,
        max_cpu_loras: Option<usize>,
        max_skipped_steps: u64,
        queue_capacity: usize,
        max_loading: usize,
    ) -> PyResult<Self> {
        let config = SchedulerConfig {
            max_num_seqs,
            max_num_batched_tokens,
            max_model_len,
            block_size,
            num_blocks,
            max_loras,
            max_cpu_loras: max_cpu_loras.unwrap_or(max_loras),
            max_skipped_steps,
            queue_capacity,
            max_loading,
        };
        let core = Scheduler::new(config.clone()).map_err(to_py_err)?;
        Ok(Self {
            submitter: core.submitter(),
            core: Mutex::new(core),
            config,
        })
    }

    /// ``prompt_token_ids``: given, the request takes part in the prefix cache (its full
    /// blocks are cached as computed; with ``read_cache``, admission starts from cached ones;
    /// only requests with the same ``cache_salt`` share blocks). ``tenant``: under fair share,
    /// the client it counts against (else its adapter).
    #[pyo3(signature = (request_id, num_prompt_tokens, adapter_key=None, priority=0, prompt_token_ids=None, read_cache=true, cache_salt=None, tenant=None))]
    #[allow(clippy::too_many_arguments)]
    fn add_request(
        &self,
        py: Python<'_>,
        request_id: u64,
        num_prompt_tokens: usize,
        adapter_key: Option<i64>,
        priority: i32,
        prompt_token_ids: Option<Vec<u32>>,
        read_cache: bool,
        cache_salt: Option<String>,
        tenant: Option<String>,
    ) -> PyResult<()> {
        let request = NewRequest {
            id: request_id,
            num_prompt_tokens,
            adapter: adapter_key,
            priority,
            prompt: prompt_token_ids,
            read_cache,
            cache_salt,
            tenant,
        };
        py.detach(|| self.submitter.add(request)).map_err(to_py_err)
    }

    fn abort_request(&self, py: Python<'_>, request_id: u64) -> PyResult<()> {
        py.detach(|| self.submitter.abort(request_id))
            .map_err(to_py_err)
    }

    fn schedule(&self, py: Python<'_>) -> PyResult<PyStepPlan> {
        let out = py.detach(|| self.core.lock().schedule());
        PyStepPlan::new(py, out, self.config.block_size)
    }

    /// ``sampled``: (request id, token id) for each request that sampled a token this step
    /// and takes part in the prefix cache.
    #[pyo3(signature = (finished, sampled=Vec::new()))]
    fn postprocess(
        &self,
        py: Python<'_>,
        finished: Vec<u64>,
        sampled: Vec<(u64, u32)>,
    ) -> Vec<u64> {
        py.detach(|| self.core.lock().postprocess(&finished, &sampled))
    }

    /// Fair share across clients (``scheduling_policy="fair"``) on or off.
    fn set_fair_share(&self, on: bool) {
        self.core.lock().set_fair_share(on);
    }

    /// A client's (an adapter's ``lora_int_id``; 0 the base) share weight under fair share.
    fn set_client_weight(&self, client: i64, weight: f64) {
        self.core.lock().set_client_weight(client, weight);
    }

    /// A tenant's share weight under fair share, by name.
    fn set_tenant_weight(&self, name: &str, weight: f64) {
        self.core.lock().set_tenant_weight(name, weight);
    }

    /// A client's weighted service so far under fair share.
    fn client_service(&self, client: i64) -> f64 {
        self.core.lock().client_service(client)
    }

    /// The tenants fair share knows now: ``(name, weighted service, unfinished requests)``,
    /// by name (an idle tenant the others have passed is forgotten).
    fn tenant_service(&self) -> Vec<(String, f64, usize)> {
        self.core.lock().tenant_service()
    }

    /// Forgets every cached prefix; returns how many blocks were cached.
    fn reset_prefix_cache(&self) -> usize {
        self.core.lock().reset_prefix_cache()
    }

    #[getter]
    fn num_cached_blocks(&self) -> usize {
        self.core.lock().kv().num_cached_blocks()
    }

    fn register_adapter(&self, request: PyRef<'_, PyLoRARequest>) -> PyResult<(i64, bool)> {
        let mut core = self.core.lock();
        core.register_adapter(&request.inner).map_err(to_py_err)
    }

    fn reload_adapter(&self, request: PyRef<'_, PyLoRARequest>) -> PyResult<(i64, bool)> {
        let mut core = self.core.lock();
        core.reload_adapter(&request.inner).map_err(to_py_err)
    }

    fn adapter_key(&self, lora_int_id: i64) -> Option<i64> {
        self.core.lock().adapter_key(lora_int_id)
    }

    fn stage_adapter(&self, key: i64) -> PyResult<(&'static str, Option<ReadTuple>)> {
        let staging = self.core.lock().stage_adapter(key).map_err(to_py_err)?;
        Ok(match staging {
            Staging::Ready => ("ready", None),
            Staging::Loading => ("loading", None),
            Staging::Read(job) => ("read", Some(read_tuple(job))),
        })
    }

    /// `"absent"`, `"loading"`, `"ready"`, or `"gone"` (forgotten).
    fn adapter_state(&self, key: i64) -> &'static str {
        let core = self.core.lock();
        let adapters = core.adapters();
        if !adapters.is_live(key) {
            return "gone";
        }
        match adapters.residency(key) {
            Residency::Absent => "absent",
            Residency::Loading => "loading",
            Residency::Ready => "ready",
        }
    }

    /// The adapter registered under `name`, as the registry holds it.
    fn adapter_by_name(&self, name: &str) -> Option<PyLoRARequest> {
        self.core.lock().adapters().by_name(name).map(request_to_py)
    }

    /// Every registered adapter, by ascending id.
    fn registered_adapters(&self) -> Vec<PyLoRARequest> {
        let core = self.core.lock();
        core.adapters()
            .registered()
            .into_iter()
            .map(request_to_py)
            .collect()
    }

    fn adapter_request(&self, key: i64) -> Option<PyLoRARequest> {
        let core = self.core.lock();
        core.adapters().request(key).cloned().map(request_to_py)
    }

    #[pyo3(signature = (key, explicit=false))]
    fn adapter_validated(&self, key: i64, explicit: bool) -> (&'static str, Option<usize>) {
        match self.core.lock().adapter_validated(key, explicit) {
            Placement::Slot(slot) => ("slot", Some(slot)),
            Placement::Wait => ("wait", None),
            Placement::Gone => ("gone", None),
        }
    }

    fn adapter_loaded(&self, key: i64, host_slot: usize) {
        self.core.lock().adapter_loaded(key, host_slot);
    }

    fn adapter_failed(&self, key: i64, message: &str) {
        self.core.lock().adapter_failed(key, message);
    }

    fn pin_adapter(&self, key: i64) -> PyResult<()> {
        self.core.lock().pin_adapter(key).map_err(to_py_err)
    }

    fn unpin_adapter(&self, key: i64) -> bool {
        self.core.lock().unpin_adapter(key)
    }

    #[pyo3(signature = (lora_int_id, force=false))]
    fn remove_adapter(&self, lora_int_id: i64, force: bool) -> PyResult<Vec<u64>> {
        self.core
            .lock()
            .remove_adapter(lora_int_id, force)
            .map_err(to_py_err)
    }

    fn resident_adapters(&self) -> Vec<i64> {
        self.core.lock().resident_adapters()
    }

    /// Where adapter `lora_int_id`'s current weights are: `(on_device, in_host, pinned)`;
    /// `None` for an unknown adapter.
    fn adapter_residency(&self, lora_int_id: i64) -> Option<(bool, bool, bool)> {
        let core = self.core.lock();
        let adapters = core.adapters();
        let key = adapters.key_of(lora_int_id)?;
        let ready = adapters.residency(key) == crate::adapters::Residency::Ready;
        let on_device = ready && adapters.device.get(&key).is_some();
        let pinned = adapters.device.is_pinned(&key) || adapters.host.is_pinned(&key);
        Some((on_device, ready, pinned))
    }

    fn has_unfinished_requests(&self) -> bool {
        self.core.lock().has_unfinished()
    }

    #[getter]
    fn num_waiting(&self) -> usize {
        self.core.lock().num_waiting()
    }
    #[getter]
    fn num_running(&self) -> usize {
        self.core.lock().num_running()
    }
    #[getter]
    fn num_loading(&self) -> usize {
        self.core.lock().adapters().num_loading()
    }
    #[getter]
    fn num_free_blocks(&self) -> usize {
        self.core.lock().kv().num_free_blocks()
    }
    #[getter]
    fn max_num_seqs(&self) -> usize {
        self.config.max_num_seqs
    }
    #[getter]
    fn max_num_batched_tokens(&self) -> usize {
        self.config.max_num_batched_tokens
    }
    #[getter]
    fn max_model_len(&self) -> usize {
        self.config.max_model_len
    }
    #[getter]
    fn block_size(&self) -> usize {
        self.config.block_size
    }
    #[getter]
    fn num_blocks(&self) -> usize {
        self.config.num_blocks
    }
    #[getter]
    fn max_loras(&self) -> usize {
        self.config.max_loras
    }
    #[getter]
    fn max_cpu_loras(&self) -> usize {
        self.config.max_cpu_loras
    }
    #[getter]
    fn max_loading(&self) -> usize {
        self.config.max_loading
    }
}

/// One step's plan, converted to Python objects once: per-request lists in batch order
/// (grouped by adapter slot), flat per-token lists, and the step's slot traffic.
#[pyclass(name = "StepPlan", module = "loraplex._core", frozen, get_all)]
pub struct PyStepPlan {
    request_ids: Py<PyAny>,
    num_computed_tokens: Py<PyAny>,
    num_new_tokens: Py<PyAny>,
    sample_rows: Py<PyAny>,
    block_tables: Py<PyAny>,
    positions: Py<PyAny>,
    slot_mapping: Py<PyAny>,
    segments: Py<PyAny>,
    loads: Py<PyAny>,
    reads: Py<PyAny>,
    commits: Py<PyAny>,
    unheld: Py<PyAny>,
    preempted: Py<PyAny>,
    ended: Py<PyAny>,
    num_queried_tokens: Py<PyAny>,
    num_cached_tokens: Py<PyAny>,
    num_batched_tokens: usize,
}

fn py_list<'py, T: IntoPyObject<'py>>(py: Python<'py>, items: Vec<T>) -> PyResult<Py<PyAny>> {
    Ok(PyList::new(py, items)?.into_any().unbind())
}

impl PyStepPlan {
    fn new(py: Python<'_>, out: SchedulerOutput, block_size: usize) -> PyResult<Self> {
        let (positions, slot_mapping) = out.positions_and_slots(block_size);
        let seqs = &out.seqs;
        let ended: Vec<(u64, Option<String>)> = out
            .aborted
            .iter()
            .map(|id| (*id, None))
            .chain(
                out.rejected
                    .iter()
                    .map(|(id, e)| (*id, Some(e.to_string()))),
            )
            .collect();
        let segments: Vec<_> = out
            .segments
            .iter()
            .map(|s| (s.start, s.len, s.slot, s.host_slot))
            .collect();
        let loads: Vec<_> = out
            .loads
            .iter()
            .map(|l| (l.slot, l.adapter, l.host_slot))
            .collect();
        let sample_rows: Vec<usize> = (0..seqs.len()).filter(|i| seqs[*i].samples).collect();
        let num_batched_tokens = out.num_batched_tokens();
        Ok(Self {
            request_ids: py_list(py, seqs.iter().map(|s| s.request_id).collect())?,
            num_computed_tokens: py_list(py, seqs.iter().map(|s| s.num_computed_tokens).collect())?,
            num_new_tokens: py_list(py, seqs.iter().map(|s| s.num_new_tokens).collect())?,
            sample_rows: py_list(py, sample_rows)?,
            block_tables: py_list(py, seqs.iter().map(|s| s.block_table.clone()).collect())?,
            positions: py_list(py, positions)?,
            slot_mapping: py_list(py, slot_mapping)?,
            segments: py_list(py, segments)?,
            loads: py_list(py, loads)?,
            reads: py_list(py, out.reads.into_iter().map(read_tuple).collect())?,
            commits: py_list(py, out.commits)?,
            unheld: py_list(py, out.unheld)?,
            preempted: py_list(py, out.preempted)?,
            ended: py_list(py, ended)?,
            num_queried_tokens: py_list(py, seqs.iter().map(|s| s.num_queried_tokens).collect())?,
            num_cached_tokens: py_list(py, seqs.iter().map(|s| s.num_cached_tokens).collect())?,
            num_batched_tokens,
        })
    }
}

#[pymethods]
impl PyStepPlan {
    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        self.request_ids.bind(py).len()
    }
}

/// PEFT module patterns matched in linear time (`pattern.rs`).
#[pyclass(name = "ModulePatterns", module = "loraplex._core", frozen)]
pub struct PyModulePatterns {
    inner: crate::pattern::ModulePatterns,
}

#[pymethods]
impl PyModulePatterns {
    /// `ValueError` naming the first pattern that does not compile, by its index.
    #[new]
    fn new(patterns: Vec<String>) -> PyResult<Self> {
        crate::pattern::ModulePatterns::new(&patterns)
            .map(|inner| Self { inner })
            .map_err(|(i, why)| {
                let shown: String = patterns[i].chars().take(200).collect();
                PyValueError::new_err(format!("pattern {i} ({shown:?}): {why}"))
            })
    }

    /// The index of the first pattern matching `key`'s tail (PEFT's rank_pattern rule).
    fn first_match(&self, key: &str) -> Option<usize> {
        self.inner.first_match(key)
    }
}

/// An adapter's safetensors file read into memory (`adapter_file.rs`); the loader validates
/// the adapter from `tensors()` and fills slots from it.
#[pyclass(name = "AdapterFile", module = "loraplex._core", frozen)]
pub struct PyAdapterFile {
    inner: AdapterFile,
}

fn read_error(e: ReadError) -> PyErr {
    match e {
        ReadError::Io(e) => e.into(),
        ReadError::Format(_) => PyValueError::new_err(e.to_string()),
        ReadError::Refused(why) => PyPermissionError::new_err(why),
    }
}

fn resolve_how(walk: bool) -> crate::confined::Resolve {
    if walk {
        crate::confined::Resolve::Walk
    } else {
        crate::confined::Resolve::Auto
    }
}

/// `path` (relative) opened read-only and non-blocking beneath the folder `root`, never
/// following a link out of it (`confined.rs`): a raw descriptor the caller owns.
/// `OSError` with the kernel's errno (EXDEV: it leads outside the root) and words for it.
#[pyfunction]
#[pyo3(signature = (root, path, walk=false))]
fn open_beneath(py: Python<'_>, root: PathBuf, path: PathBuf, walk: bool) -> PyResult<i32> {
    use std::os::fd::IntoRawFd;
    py.detach(|| crate::confined::open_beneath(&root, &path, resolve_how(walk)))
        .map(|f| f.into_raw_fd())
        .map_err(|e| {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            PyOSError::new_err((errno, crate::confined::describe(&e)))
        })
}

#[pymethods]
impl PyAdapterFile {
    /// Reads and parses `path` (without the GIL); `OSError` if it cannot be read,
    /// `ValueError` if it is not a safetensors file.
    /// With `root`, `path` is relative to it and opened beneath it, never following a
    /// link out (`confined.rs`; `walk` forces the component walk over `openat2`).
    #[staticmethod]
    #[pyo3(signature = (path, root=None, walk=false))]
    fn read(py: Python<'_>, path: PathBuf, root: Option<PathBuf>, walk: bool) -> PyResult<Self> {
        let inner = py
            .detach(|| match &root {
                Some(root) => AdapterFile::read_beneath(root, &path, resolve_how(walk)),
                None => AdapterFile::read(&path),
            })
            .map_err(read_error)?;
        Ok(Self { inner })
    }

    /// Parses a safetensors file held in memory.
    #[staticmethod]
    fn from_bytes(py: Python<'_>, data: Vec<u8>) -> PyResult<Self> {
        let inner = py
            .detach(|| AdapterFile::from_bytes(data))
            .map_err(read_error)?;
        Ok(Self { inner })
    }

    /// `[(name, dtype, shape, max_abs)]` in file order: dtype as safetensors names it
    /// ("F32", "BF16", ...), max_abs the largest magnitude as float32 (NaN if any value is
    /// NaN), None for a dtype that is not a float.
    fn tensors(&self) -> Vec<(String, String, Vec<usize>, Option<f32>)> {
        let entries = self.inner.entries().iter();
        entries
            .zip(self.inner.max_abs())
            .map(|(e, &max_abs)| {
                (
                    e.name.clone(),
                    format!("{:?}", e.dtype),
                    e.shape.clone(),
                    max_abs,
                )
            })
            .collect()
    }

    /// The header's JSON: files that share it have the same names, dtypes, shapes and
    /// offsets.
    fn header<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.header())
    }

    /// Each tensor's max_abs, in file order (see `tensors`).
    fn max_abs(&self) -> Vec<Option<f32>> {
        self.inner.max_abs().to_vec()
    }

    /// The file's bytes.
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.bytes())
    }

    /// Copies weights into slot memory, without the GIL. `dsts`: (address, bytes) of each
    /// destination region, which the caller owns and nothing else reads or writes during the
    /// call (one slot of a stacked tensor); `dtype`: "float32", "bfloat16" or "float16";
    /// `copies`: (tensor index, destination index, offset, stride, transpose, scale), see
    /// `WeightCopy`. Every copy is bounds-checked before anything is written.
    fn fill(
        &self,
        py: Python<'_>,
        dsts: Vec<(usize, usize)>,
        dtype: &str,
        copies: Vec<(usize, usize, usize, usize, bool, f32)>,
    ) -> PyResult<()> {
        let dtype = match dtype {
            "float32" => SlotDtype::F32,
            "bfloat16" => SlotDtype::BF16,
            "float16" => SlotDtype::F16,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unsupported slot dtype {other}"
                )))
            }
        };
        let copies: Vec<WeightCopy> = copies
            .into_iter()
            .map(
                |(tensor, dst, offset, stride, transpose, scale)| WeightCopy {
                    tensor,
                    dst,
                    offset,
                    stride,
                    transpose,
                    scale,
                },
            )
            .collect();
        // what can be checked of the caller's promise: non-null, and no two regions overlap
        let mut spans: Vec<(usize, usize)> = dsts.iter().copied().filter(|&(_, n)| n > 0).collect();
        spans.sort_unstable();
        if spans.first().is_some_and(|&(address, _)| address == 0)
            || spans
                .iter()
                .any(|&(a, n)| a.checked_add(n).is_none_or(|end| end > isize::MAX as usize))
            || spans.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0)
        {
            return Err(PyValueError::new_err(
                "destinations must be non-null and disjoint",
            ));
        }
        py.detach(|| {
            // SAFETY: the caller hands regions of live tensors it owns, which no other code
            // touches during the call (LoRASlots: one slot, given to this fill alone by the
            // core); they are non-null and disjoint (checked above)
            let mut regions: Vec<&mut [u8]> = dsts
                .iter()
                .map(|&(address, len)| match len {
                    0 => &mut [][..],
                    _ => unsafe { std::slice::from_raw_parts_mut(address as *mut u8, len) },
                })
                .collect();
            self.inner.fill(&mut regions, dtype, &copies)
        })
        .map_err(PyValueError::new_err)
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyLoRARequest>()?;
    m.add_class::<PyAdapterRegistry>()?;
    m.add_class::<PyScheduler>()?;
    m.add_class::<PyStepPlan>()?;
    m.add_class::<PyAdapterFile>()?;
    m.add_class::<PyModulePatterns>()?;
    m.add_function(wrap_pyfunction!(_restore_lora_request, m)?)?;
    m.add_function(wrap_pyfunction!(open_beneath, m)?)?;
    let t = error_types(py)?;
    for (name, ty) in [
        ("LoraplexError", &t.root),
        ("InvalidLoRARequestError", &t.invalid_lora_request),
        ("AdapterConflictError", &t.adapter_conflict),
        ("UnknownAdapterError", &t.unknown_adapter),
        ("NoFreeSlotError", &t.no_free_slot),
        ("AdapterInUseError", &t.adapter_in_use),
        ("AdapterNotLoadedError", &t.adapter_not_loaded),
        ("QueueFullError", &t.queue_full),
        ("DuplicateRequestError", &t.duplicate_request),
        ("InvalidRequestError", &t.invalid_request),
        ("InvalidConfigError", &t.invalid_config),
    ] {
        m.add(name, ty.clone_ref(py))?;
    }
    Ok(())
}
