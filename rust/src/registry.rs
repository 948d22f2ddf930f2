//! Adapter identity: id <-> name <-> path, with uniqueness enforced.
//!
//! vLLM documents that `lora_int_id` must be unique per adapter but never checks it; two
//! different adapters under one id silently share weights there. Here a clash is an error
//! that names both adapters.

use std::collections::HashMap;

use parking_lot::RwLock;

use crate::error::{Error, Result};
use crate::request::{AdapterId, LoRARequest};

#[derive(Default)]
struct Maps {
    by_id: HashMap<AdapterId, LoRARequest>,
    by_name: HashMap<String, AdapterId>,
}

/// The set of known adapters. `Send + Sync`: every method takes `&self`.
#[derive(Default)]
pub struct AdapterRegistry {
    maps: RwLock<Maps>,
}

impl AdapterRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `request`. Returns `true` if it was new, `false` if the identical adapter
    /// (same name, id and path) was already registered.
    ///
    /// # Errors
    /// [`Error::AdapterConflict`] naming both adapters when the id is held by another name,
    /// the name by another id, or the (name, id) pair with another path.
    pub fn register(&self, request: &LoRARequest) -> Result<bool> {
        let mut maps = self.maps.write();
        if let Some(existing) = maps.by_id.get(&request.lora_int_id) {
            let reason = if existing.lora_name != request.lora_name {
                format!("id {} is already taken", request.lora_int_id)
            } else if existing.lora_path != request.lora_path {
                "same name and id with a different path".to_string()
            } else {
                return Ok(false);
            };
            return Err(conflict(request, existing, reason));
        }
        if let Some(id) = maps.by_name.get(&request.lora_name) {
            let existing = &maps.by_id[id];
            let reason = format!("name '{}' is already taken", request.lora_name);
            return Err(conflict(request, existing, reason));
        }
        maps.by_name
            .insert(request.lora_name.clone(), request.lora_int_id);
        maps.by_id.insert(request.lora_int_id, request.clone());
        Ok(true)
    }

    /// Removes the adapter with this id, freeing its id and name.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] when no adapter holds `id`.
    pub fn unregister(&self, id: AdapterId) -> Result<LoRARequest> {
        let mut maps = self.maps.write();
        let request = maps.by_id.remove(&id).ok_or(Error::UnknownAdapter(id))?;
        maps.by_name.remove(&request.lora_name);
        Ok(request)
    }

    /// The adapter registered under `id`.
    pub fn get(&self, id: AdapterId) -> Option<LoRARequest> {
        self.maps.read().by_id.get(&id).cloned()
    }

    /// The adapter registered under `name`.
    pub fn get_by_name(&self, name: &str) -> Option<LoRARequest> {
        let maps = self.maps.read();
        maps.by_name.get(name).map(|id| maps.by_id[id].clone())
    }

    /// Whether `id` is registered.
    pub fn contains(&self, id: AdapterId) -> bool {
        self.maps.read().by_id.contains_key(&id)
    }

    /// Number of registered adapters.
    pub fn len(&self) -> usize {
        self.maps.read().by_id.len()
    }

    /// Whether no adapter is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registered adapter ids, ascending.
    pub fn ids(&self) -> Vec<AdapterId> {
        let mut ids: Vec<_> = self.maps.read().by_id.keys().copied().collect();
        ids.sort_unstable();
        ids
    }
}

fn conflict(new: &LoRARequest, existing: &LoRARequest, reason: String) -> Error {
    Error::AdapterConflict {
        new: new.describe(),
        existing: existing.describe(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, id: i64, path: &str) -> LoRARequest {
        LoRARequest::new(name, id, path).unwrap()
    }

    #[test]
    fn conflicts_name_both_adapters() {
        let reg = AdapterRegistry::new();
        assert!(reg.register(&req("sql", 1, "/a/sql")).unwrap());
        assert!(!reg.register(&req("sql", 1, "/a/sql")).unwrap());
        for bad in [
            req("code", 1, "/a/code"),
            req("sql", 2, "/a/sql"),
            req("sql", 1, "/b"),
        ] {
            let msg = reg.register(&bad).unwrap_err().to_string();
            assert!(msg.contains("'sql' (id 1, path /a/sql)"), "{msg}");
            assert!(msg.contains(&bad.describe()), "{msg}");
        }
        assert_eq!(reg.len(), 1);
    }

    #[test]
    fn unregister_frees_id_and_name() {
        let reg = AdapterRegistry::new();
        reg.register(&req("sql", 1, "/a")).unwrap();
        assert_eq!(reg.unregister(1).unwrap().lora_name, "sql");
        assert_eq!(reg.unregister(1).unwrap_err(), Error::UnknownAdapter(1));
        assert!(reg.register(&req("code", 1, "/c")).unwrap());
        assert!(reg.register(&req("sql", 2, "/a")).unwrap());
        assert_eq!(reg.get_by_name("sql").unwrap().lora_int_id, 2);
        assert_eq!(reg.get(1).unwrap().lora_name, "code");
        assert_eq!(reg.ids(), vec![1, 2]);
    }
}
