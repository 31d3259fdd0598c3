//! A rotation whose keys are shared by several CA replicas (Kubernetes mode, Secret
//! `palisade-ca-keys`): the store is held in memory behind a handle that the code syncing it with
//! the API server also holds, and a replica that does not drive the rotation reloads the state
//! another replica wrote. Kept apart from `driver.rs` so that the phases stay in one place.

use std::sync::{Arc, Mutex};

use time::OffsetDateTime;

use super::keyset::{self, CURRENT, KeySet, NEXT};
use super::{Keys, Rotation, RotationError, build};
use crate::keys::{KeyError, KeyStore, MemoryStore};

/// An in-memory [`KeyStore`] with a second handle: the rotation writes through one, the Secret
/// sync reads (and replaces) through the other. Writes can be refused ([`SharedStore::refuse_writes`]):
/// a replica that does not drive the rotation must not start or abort one.
#[derive(Clone, Default)]
pub struct SharedStore(Arc<Mutex<MemoryStore>>, Arc<Mutex<Option<String>>>);

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: the values hold private keys.
        let names: Vec<String> = self.lock().keys().cloned().collect();
        f.debug_tuple("SharedStore").field(&names).finish()
    }
}

impl SharedStore {
    pub fn new(entries: MemoryStore) -> Self {
        SharedStore(Arc::new(Mutex::new(entries)), Arc::default())
    }

    /// From now on every write and removal fails with `why` (the rotation then changes
    /// nothing); `None` allows them again.
    pub fn refuse_writes(&self, why: Option<String>) {
        *self.1.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    fn writable(&self) -> Result<(), KeyError> {
        match &*self.1.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Err(KeyError::NotDriver(why.clone())),
            None => Ok(()),
        }
    }

    /// What the store holds now.
    pub fn snapshot(&self) -> MemoryStore {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryStore> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl KeyStore for SharedStore {
    fn label(&self, name: &str) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("key {name}"))
    }

    fn read(&self, name: &str, _private: bool) -> Result<Option<String>, KeyError> {
        Ok(self.lock().get(name).cloned())
    }

    fn write(&mut self, name: &str, text: &str, _private: bool) -> Result<(), KeyError> {
        self.writable()?;
        self.lock().insert(name.to_owned(), text.to_owned());
        Ok(())
    }

    fn remove(&mut self, name: &str) -> Result<(), KeyError> {
        self.writable()?;
        self.lock().remove(name);
        Ok(())
    }
}

impl Rotation {
    /// Replaces the keys, the phase, the authority and the trust view with what `entries` hold
    /// (another replica's move, read back from the Secret), and publishes the new view to every
    /// watch. Nothing is written: a replica that does not drive the rotation never finishes or
    /// cleans up one (the driver does, and `open` at the next start). On an error nothing
    /// changes. Returns whether the phase or the keys changed.
    pub fn reload(
        &self,
        store: &SharedStore,
        entries: MemoryStore,
        now: OffsetDateTime,
    ) -> Result<bool, RotationError> {
        let record = keyset::read_record(&entries)?;
        let current = KeySet::load(&entries, &CURRENT, now)?;
        let next = match &record {
            Some(_) => Some(KeySet::load(&entries, &NEXT, now)?),
            None => None,
        };
        let mut guard = self.lock();
        let Some(keys) = guard.as_mut() else {
            return Err(RotationError::Unsupported(
                self.unsupported.unwrap_or("its keys are not its own"),
            ));
        };
        let same = keys.record == record
            && keys.current.root == current.root
            && keys.current.intermediate == current.intermediate
            && keys.next.as_ref().map(|s| (&s.root, &s.intermediate))
                == next.as_ref().map(|s| (&s.root, &s.intermediate));
        let fresh = Keys {
            store: Box::new(store.clone()),
            current,
            next,
            record,
            lagging_reported: same && keys.lagging_reported,
        };
        let (authority, view) = build(&fresh, &self.extra_roots, self.settings.renew_window)?;
        *store.lock() = entries;
        *keys = fresh;
        self.metrics.set_keys(
            keys.phase(),
            authority.root_not_after().unix_timestamp(),
            authority.intermediate_not_after().unix_timestamp(),
        );
        self.authority.store(Arc::new(authority));
        self.trust.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
        if !same {
            tracing::info!(
                phase = keys.phase().as_str(),
                "reloaded the rotation another CA replica wrote"
            );
        }
        Ok(!same)
    }
}
