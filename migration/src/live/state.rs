//! Component state as plain serializable data: Firecracker's `Persist` shape (a component
//! saves a State struct and is rebuilt from one), and the conversion of a State to and
//! from the [`ComponentState`] blob the stream carries (JSON: self-describing, so a
//! field added later is an error the destination names, not silent garbage).

use crate::load::ComponentState;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A component whose state travels: it saves a plain State value and is rebuilt from one.
pub trait Persist: Sized {
    /// The plain data (registers, queues, counters...).
    type State: Serialize + DeserializeOwned;
    /// What rebuilding needs besides the state (the VM's fd, the guest memory...).
    type ConstructorArgs;
    /// Why rebuilding failed.
    type Error;

    /// The component's state now (its VM paused).
    fn save(&self) -> Self::State;

    /// A component rebuilt from `state`.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// A state blob that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("state {name:?}: {source}")]
pub struct StateError {
    /// The component.
    pub name: String,
    /// The codec's error.
    pub source: serde_json::Error,
}

impl ComponentState {
    /// The blob of component `name` holding `state`.
    pub fn encode<T: Serialize>(name: &str, state: &T) -> Result<ComponentState, StateError> {
        let data = serde_json::to_vec(state).map_err(|source| StateError {
            name: name.to_string(),
            source,
        })?;
        Ok(ComponentState {
            name: name.to_string(),
            data,
        })
    }

    /// The State this blob holds.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, StateError> {
        serde_json::from_slice(&self.data).map_err(|source| StateError {
            name: self.name.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Pit {
        count: [u32; 3],
        mode: u8,
    }

    #[test]
    fn states_round_trip_and_bad_blobs_are_named() {
        let pit = Pit {
            count: [1, 2, 3],
            mode: 2,
        };
        let blob = ComponentState::encode("pit", &pit).unwrap();
        assert_eq!(blob.decode::<Pit>().unwrap(), pit);
        let bad = ComponentState {
            name: "pit".into(),
            data: b"{\"count\":[1]}".to_vec(),
        };
        let e = bad.decode::<Pit>().unwrap_err();
        assert!(e.to_string().starts_with("state \"pit\":"), "{e}");
    }
}
