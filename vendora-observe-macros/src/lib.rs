//! `#[derive(Observed)]` for [vendora-observe](https://docs.rs/vendora-observe): use it
//! through that crate, which documents the attribute.
//!
//! Parse (`ast`, `attr`) → check (`valid`) → generate (`expand`). Every attribute error is
//! collected with its span and reported together; on error a stub `ActiveModelBehavior`
//! impl is still emitted so the user sees the attribute's message, not a cascade.

mod ast;
mod attr;
mod case;
mod expand;
mod valid;

use proc_macro::TokenStream;

/// See `vendora_observe::Observed`.
#[proc_macro_derive(Observed, attributes(observe))]
pub fn derive_observed(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    expand::derive(&input).into()
}

#[cfg(test)]
mod snapshots;
