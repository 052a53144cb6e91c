//! tower-sse
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod wire;
