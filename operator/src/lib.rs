//! The concentrator operator: keeps each `Eroute` and `Egroup` status honest (`Ready=True`, or
//! `Ready=False` with reason `Invalid` and the field), and reconciles each `GatewayFleet` into
//! its gateway StatefulSet, Services, PodDisruptionBudget and rendered configuration.

pub mod controller;
pub mod fleet;
pub mod lease;
pub mod metrics;
pub mod status;
