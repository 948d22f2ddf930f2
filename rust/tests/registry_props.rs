//! The registry against a naive model, and under concurrent registration.

use std::collections::HashMap;
use std::sync::Arc;

use loraplex::{AdapterRegistry, Error, LoRARequest};
use proptest::prelude::*;

fn request() -> impl Strategy<Value = LoRARequest> {
    (0u8..5, 1i64..6, 0u8..2)
        .prop_map(|(n, id, p)| LoRARequest::new(format!("a{n}"), id, format!("/p{p}")).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn matches_naive_model(ops in prop::collection::vec((any::<bool>(), request()), 1..60)) {
        let reg = AdapterRegistry::new();
        let mut model: HashMap<i64, (String, String)> = HashMap::new();
        for (register, r) in ops {
            if register {
                let by_name = model.iter().find(|(_, (n, _))| *n == r.lora_name).map(|(id, _)| *id);
                let expected = match (model.get(&r.lora_int_id), by_name) {
                    (Some((n, p)), _) if *n == r.lora_name && *p == r.lora_path => Ok(false),
                    (Some(_), _) | (None, Some(_)) => Err(()),
                    (None, None) => Ok(true),
                };
                match (reg.register(&r), expected) {
                    (Ok(new), Ok(exp)) => prop_assert_eq!(new, exp),
                    (Err(Error::AdapterConflict { new, existing, .. }), Err(())) => {
                        prop_assert_eq!(new, r.describe());
                        let holder = model.get(&r.lora_int_id).map(|_| r.lora_int_id).or(by_name).unwrap();
                        let (n, p) = &model[&holder];
                        prop_assert_eq!(existing, format!("'{n}' (id {holder}, path {p})"));
                    }
                    (got, exp) => prop_assert!(false, "got {:?}, expected {:?}", got, exp),
                }
                if expected == Ok(true) {
                    model.insert(r.lora_int_id, (r.lora_name.clone(), r.lora_path.clone()));
                }
            } else {
                let got = reg.unregister(r.lora_int_id).map(|x| x.lora_name);
                match model.remove(&r.lora_int_id) {
                    Some((n, _)) => prop_assert_eq!(got, Ok(n)),
                    None => prop_assert_eq!(got, Err(Error::UnknownAdapter(r.lora_int_id))),
                }
            }
            prop_assert_eq!(reg.len(), model.len());
            for (id, (n, _)) in &model {
                prop_assert_eq!(reg.get_by_name(n).map(|x| x.lora_int_id), Some(*id));
            }
        }
    }
}

/// Eight threads race to register the same eight ids under their own names: each id ends up
/// held by exactly one name, and exactly one registration per id succeeded.
#[test]
fn concurrent_registration_keeps_ids_unique() {
    let reg = Arc::new(AdapterRegistry::new());
    let winners: Vec<Vec<i64>> = (0..8)
        .map(|t| {
            let reg = Arc::clone(&reg);
            std::thread::spawn(move || {
                (1..=8)
                    .filter(|id| {
                        let r = LoRARequest::new(format!("t{t}-{id}"), *id, "/p").unwrap();
                        reg.register(&r).unwrap_or(false)
                    })
                    .collect()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let mut won: Vec<i64> = winners.into_iter().flatten().collect();
    won.sort_unstable();
    assert_eq!(won, (1..=8).collect::<Vec<_>>());
    assert_eq!(reg.len(), 8);
}
