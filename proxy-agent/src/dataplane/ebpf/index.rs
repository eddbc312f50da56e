//! Which frontend a reverse-NAT index stands for and which backend an id names, shared
//! with readers outside the sync loop (metrics, `/debug`) that see only ids in the maps.
use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use super::dense::IdTable;
use crate::model::{Backend, FrontendKey};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Index {
    pub frontends: HashMap<u32, FrontendKey>,
    pub backends: IdTable<Backend>,
}

pub type SharedIndex = Arc<RwLock<Index>>;
