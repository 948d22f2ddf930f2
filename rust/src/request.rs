//! `LoRARequest`: which adapter a generation request uses, validated on construction.

use std::path::Path;

use crate::error::{Error, Result};

/// An adapter id: vLLM's `lora_int_id`, always `>= 1`.
pub type AdapterId = i64;

/// The data of vLLM's `LoRARequest` (the Python-only `tensorizer_config_dict` lives in the
/// bindings). Equality and hashing are by `lora_name`, as in vLLM.
#[derive(Debug, Clone)]
pub struct LoRARequest {
    /// Human-readable adapter name; identity for equality and hashing.
    pub lora_name: String,
    /// Integer id, unique per adapter, `>= 1`.
    pub lora_int_id: AdapterId,
    /// Local folder or hub repo id of the PEFT adapter.
    pub lora_path: String,
    /// Long-context LoRA max length (accepted for vLLM compatibility).
    pub long_lora_max_len: Option<u64>,
    /// The base model the adapter was trained on, when the caller states it.
    pub base_model_name: Option<String>,
}

impl LoRARequest {
    /// Builds a validated request.
    ///
    /// # Errors
    /// [`Error::InvalidLoraId`] when `lora_int_id < 1`, [`Error::EmptyLoraName`] for an empty
    /// name, [`Error::EmptyLoraPath`] for an empty path.
    pub fn new(
        lora_name: impl Into<String>,
        lora_int_id: AdapterId,
        lora_path: impl Into<String>,
    ) -> Result<Self> {
        let request = Self {
            lora_name: lora_name.into(),
            lora_int_id,
            lora_path: lora_path.into(),
            long_lora_max_len: None,
            base_model_name: None,
        };
        request.validate()?;
        Ok(request)
    }

    /// Checks the invariants `new` establishes (the bindings build the struct field by field).
    ///
    /// # Errors
    /// As [`LoRARequest::new`].
    pub fn validate(&self) -> Result<()> {
        if self.lora_int_id < 1 {
            return Err(Error::InvalidLoraId(self.lora_int_id));
        }
        if self.lora_name.is_empty() {
            return Err(Error::EmptyLoraName(self.lora_int_id));
        }
        if self.lora_path.is_empty() {
            return Err(Error::EmptyLoraPath(self.lora_name.clone()));
        }
        Ok(())
    }

    /// A request whose id is derived from the adapter's location, so every process that
    /// names the same adapter agrees on its id without coordination.
    ///
    /// The location is the canonical absolute path when `path` exists on this machine, else
    /// `path` itself (a hub repo id) without trailing slashes. The id is FNV-1a 64 of that
    /// string reduced into `1..=2^31-1` (it fits vLLM's int32 id tensors). Two locations share
    /// an id with probability about 1 in 2^31 per pair; the registry rejects such a clash.
    /// The name defaults to the folder's name for a local path, or the repo id.
    ///
    /// # Errors
    /// [`Error::EmptyLoraPath`] for an empty path, [`Error::EmptyLoraName`] for an empty name.
    pub fn from_path(path: &str, name: Option<&str>) -> Result<Self> {
        let location = canonical_location(path);
        if location.is_empty() {
            return Err(Error::EmptyLoraPath(name.unwrap_or("").to_string()));
        }
        let default_name = if Path::new(path).exists() {
            Path::new(&location)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| location.clone())
        } else {
            location.clone()
        };
        let name = name.map(str::to_string).unwrap_or(default_name);
        Self::new(name, location_id(&location), path)
    }

    /// `'name' (id N, path P)`: how errors name an adapter.
    pub fn describe(&self) -> String {
        format!(
            "'{}' (id {}, path {})",
            self.lora_name, self.lora_int_id, self.lora_path
        )
    }
}

impl PartialEq for LoRARequest {
    fn eq(&self, other: &Self) -> bool {
        self.lora_name == other.lora_name
    }
}

impl Eq for LoRARequest {}

impl std::hash::Hash for LoRARequest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.lora_name.hash(state);
    }
}

/// The string an adapter's id is derived from (see [`LoRARequest::from_path`]).
pub fn canonical_location(path: &str) -> String {
    match std::fs::canonicalize(path) {
        Ok(p) if !path.is_empty() => p.to_string_lossy().into_owned(),
        _ => path.trim_end_matches('/').to_string(),
    }
}

/// FNV-1a 64 of `location`, reduced into `1..=2^31-1`.
pub fn location_id(location: &str) -> AdapterId {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = location
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (hash % (i32::MAX as u64)) as AdapterId + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_ids_and_paths() {
        assert_eq!(
            LoRARequest::new("a", 0, "/p").unwrap_err().to_string(),
            "id must be > 0, got 0"
        );
        assert_eq!(
            LoRARequest::new("a", -3, "/p").unwrap_err(),
            Error::InvalidLoraId(-3)
        );
        assert!(LoRARequest::new("a", 1, "")
            .unwrap_err()
            .to_string()
            .contains("lora_path cannot be empty"));
        assert_eq!(
            LoRARequest::new("", 1, "/p").unwrap_err(),
            Error::EmptyLoraName(1)
        );
    }

    #[test]
    fn equality_is_by_name() {
        let a = LoRARequest::new("a", 1, "/x").unwrap();
        let b = LoRARequest::new("a", 2, "/y").unwrap();
        let c = LoRARequest::new("c", 1, "/x").unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn from_path_is_deterministic_and_in_range() {
        let dir = std::env::temp_dir();
        let p = dir.to_string_lossy().into_owned();
        let a = LoRARequest::from_path(&p, None).unwrap();
        let b = LoRARequest::from_path(&format!("{p}/"), None).unwrap();
        assert_eq!(a.lora_int_id, b.lora_int_id);
        assert!(a.lora_int_id >= 1 && a.lora_int_id <= i64::from(i32::MAX));
        let hub = LoRARequest::from_path("org/some-adapter", None).unwrap();
        assert_eq!(hub.lora_name, "org/some-adapter");
        assert_ne!(hub.lora_int_id, a.lora_int_id);
        // FNV-1a 64 of "" is the offset basis: a fixed, independently known constant.
        assert_eq!(
            location_id(""),
            (0xcbf2_9ce4_8422_2325_u64 % 0x7fff_ffff) as i64 + 1
        );
    }
}
