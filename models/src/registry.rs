//! Per-backend custom ops, found by type.
//!
//! `Llama` and the loss are generic over any `Backend`, but a custom autodiff op (fused attention,
//! fused cross-entropy) exists only for `Autodiff<B, C>` with a concrete `B`. The trainer registers
//! the ops for the backends it builds; generic code asks for the op of its own `B`. An op is keyed
//! by its function-pointer type, which names the backend (`fn(Tensor<B, 4>, ..)` differs for every
//! `B`), so one table serves every kind of op.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

type Table = Mutex<HashMap<TypeId, Box<dyn Any + Send + Sync>>>;

fn table() -> &'static Table {
    static T: OnceLock<Table> = OnceLock::new();
    T.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Makes `f` the op of its type (idempotent; a later call replaces an earlier one).
pub fn register<F: Copy + Send + Sync + 'static>(f: F) {
    if let Ok(mut t) = table().lock() {
        t.insert(TypeId::of::<F>(), Box::new(f));
    }
}

/// The op registered for type `F`, if any.
pub fn registered<F: Copy + Send + Sync + 'static>() -> Option<F> {
    let t = table().lock().ok()?;
    t.get(&TypeId::of::<F>()).and_then(|f| f.downcast_ref::<F>()).copied()
}
