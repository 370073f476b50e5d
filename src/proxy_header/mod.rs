//! PROXY protocol: the header written towards the upstream (`outbound`).

pub mod outbound;
