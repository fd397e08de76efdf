//! The concentrator operator. This first cut checks that the CRDs are installed and keeps each
//! `Eroute` and `Egroup` status honest: `Ready=True`, or `Ready=False` with reason `Invalid`
//! and the validation message naming the field.

pub mod controller;
pub mod status;
