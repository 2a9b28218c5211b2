//! The struct as the derive sees it: its fields and which of them form the primary key.

use proc_macro2::{TokenStream, TokenTree};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, Ident, Type};

pub(crate) struct Model<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) fields: Vec<Field<'a>>,
}

pub(crate) struct Field<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) ty: &'a Type,
    pub(crate) primary_key: bool,
}

impl<'a> Model<'a> {
    pub(crate) fn from_input(input: &'a DeriveInput) -> syn::Result<Self> {
        let named = match &input.data {
            Data::Struct(s) => match &s.fields {
                Fields::Named(named) => named,
                Fields::Unnamed(f) => {
                    return Err(syn::Error::new(
                        f.span(),
                        "#[derive(Observed)] needs a struct with named fields, like a SeaORM \
                         `Model`; this is a tuple struct",
                    ));
                }
                Fields::Unit => {
                    return Err(syn::Error::new(
                        input.ident.span(),
                        "#[derive(Observed)] needs a struct with named fields, like a SeaORM \
                         `Model`; this is a unit struct",
                    ));
                }
            },
            Data::Enum(e) => {
                return Err(syn::Error::new(
                    e.enum_token.span,
                    "#[derive(Observed)] goes on a SeaORM `Model` struct, not an enum",
                ));
            }
            Data::Union(u) => {
                return Err(syn::Error::new(
                    u.union_token.span,
                    "#[derive(Observed)] goes on a SeaORM `Model` struct, not a union",
                ));
            }
        };
        let fields = named
            .named
            .iter()
            .filter_map(|f| {
                Some(Field {
                    ident: f.ident.as_ref()?,
                    ty: &f.ty,
                    primary_key: f
                        .attrs
                        .iter()
                        .filter(|a| a.path().is_ident("sea_orm"))
                        .filter_map(|a| a.meta.require_list().ok())
                        .any(|list| has_top_level_ident(&list.tokens, "primary_key")),
                })
            })
            .collect();
        Ok(Model {
            ident: &input.ident,
            fields,
        })
    }

    pub(crate) fn primary_key(&self) -> Vec<&Field<'a>> {
        self.fields.iter().filter(|f| f.primary_key).collect()
    }

    pub(crate) fn field(&self, name: &str) -> Option<&Field<'a>> {
        self.fields.iter().find(|f| f.ident == name)
    }
}

/// Whether `ident` appears as a top-level item of `#[sea_orm(...)]` (not inside a value).
fn has_top_level_ident(tokens: &TokenStream, ident: &str) -> bool {
    let mut at_item_start = true;
    for tt in tokens.clone() {
        match &tt {
            TokenTree::Ident(i) if at_item_start && i == ident => return true,
            TokenTree::Punct(p) if p.as_char() == ',' => {
                at_item_start = true;
                continue;
            }
            _ => {}
        }
        at_item_start = false;
    }
    false
}
