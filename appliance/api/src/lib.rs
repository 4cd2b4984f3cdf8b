//! Wire types of the appliance, and only wire types: the worker protocol spoken over the
//! worker's Unix socket, and the OpenAI-compatible API.
//!
//! This crate holds no logic beyond (de)serialisation and never depends on the engine,
//! the store or any listener.

pub mod openai;
pub mod worker;
