//! Expansion snapshots of the original design's three observers.

use syn::{DeriveInput, parse_quote};

fn pretty(input: DeriveInput) -> String {
    let tokens = crate::expand::expand(&input).expect("expands");
    let file: syn::File = syn::parse2(tokens).expect("the expansion is valid Rust");
    prettyplease::unparse(&file)
}

#[test]
fn product_with_watched_stock_and_own_hooks() {
    insta::assert_snapshot!(pretty(parse_quote! {
        #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Observed)]
        #[sea_orm(table_name = "products")]
        #[observe(event = "product", watch = "stock", hooks)]
        pub struct Model {
            #[sea_orm(primary_key)]
            pub id: i32,
            pub name: String,
            pub price: f64,
            pub stock: i32,
        }
    }));
}

#[test]
fn order_without_deleted() {
    insta::assert_snapshot!(pretty(parse_quote! {
        #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Observed)]
        #[sea_orm(table_name = "orders")]
        #[observe(event = "order", on(created, updated))]
        pub struct Model {
            #[sea_orm(primary_key)]
            pub id: i32,
            pub status: String,
            pub total: f64,
        }
    }));
}

#[test]
fn category_with_every_event_latest_wins() {
    insta::assert_snapshot!(pretty(parse_quote! {
        #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Observed)]
        #[sea_orm(table_name = "categories")]
        #[observe(event = "category", latest_wins)]
        pub struct Model {
            #[sea_orm(primary_key)]
            pub id: i32,
            pub name: String,
        }
    }));
}

#[test]
fn composite_key_and_renamed_crate() {
    insta::assert_snapshot!(pretty(parse_quote! {
        #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Observed)]
        #[sea_orm(table_name = "order_lines")]
        #[observe(event = "order_line", watch(quantity = "line:quantity"), crate = "vo")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub order_id: i32,
            #[sea_orm(primary_key, auto_increment = false)]
            pub line_no: i32,
            pub quantity: i32,
        }
    }));
}

#[test]
fn model_ex_expands_to_nothing() {
    let input: DeriveInput = parse_quote! {
        #[observe(event = "product")]
        pub struct ModelEx { pub id: i32 }
    };
    assert!(crate::expand::expand(&input).unwrap().is_empty());
}

#[test]
fn errors_are_all_collected() {
    let input: DeriveInput = parse_quote! {
        #[observe(evnt = "x", on(made), watch = "nope")]
        pub struct Model { #[sea_orm(primary_key)] pub id: i32 }
    };
    let err = crate::expand::expand(&input).unwrap_err();
    let messages: Vec<String> = err.into_iter().map(|e| e.to_string()).collect();
    // A misspelt `event` is one error (did you mean `event`?), not also "missing `event`".
    assert_eq!(messages.len(), 3, "{messages:#?}");
    assert!(messages[0].starts_with("unknown `observe` attribute `evnt`"));
    assert!(messages[0].ends_with("did you mean `event`?"));
    assert!(messages[1].starts_with("unknown event `made` in on(...)"));
    assert!(messages[2].starts_with("`watch` names no field of `Model`: there is no `nope`"));
    // Without anything like it, `event` is missing.
    let input: DeriveInput = parse_quote! {
        #[observe(on(created))]
        pub struct Model { #[sea_orm(primary_key)] pub id: i32 }
    };
    let err = crate::expand::expand(&input).unwrap_err();
    assert!(err.to_string().starts_with("missing `event`"), "{err}");
}

#[test]
fn room_templates_name_fields_and_balance_their_braces() {
    let messages = |attr: proc_macro2::TokenStream| -> Vec<String> {
        let input: DeriveInput = parse_quote! {
            #[observe(event = "order", #attr)]
            pub struct Model { #[sea_orm(primary_key)] pub id: i32, pub store_id: i32 }
        };
        match crate::expand::expand(&input) {
            Ok(_) => Vec::new(),
            Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
        }
    };
    assert_eq!(
        messages(quote::quote!(room = "store:{stor_id}")),
        ["`room` names no field of `Model`: there is no `stor_id`; did you mean `store_id`?"]
    );
    let first = |attr| messages(attr).first().cloned().unwrap_or_default();
    assert!(
        first(quote::quote!(room = "store:{store_id")).starts_with("`room`: a `{` without its `}`")
    );
    assert!(first(quote::quote!(room = "store:}")).starts_with("`room`: a `}` without its `{`"));
    assert!(first(quote::quote!(room = "store:{}")).starts_with("`room`: `{}` names no field"));
    assert!(first(quote::quote!(room = "")).starts_with("`room` cannot be empty"));
    assert!(
        first(quote::quote!(rooms_with = "not a path"))
            .starts_with("`rooms_with` names a function")
    );
    // Braces doubled are text; several rooms; a function beside them.
    assert!(
        messages(quote::quote!(
            room = "{{hq}}",
            room = "store:{store_id}",
            rooms_with = "f"
        ))
        .is_empty()
    );
}

#[test]
fn the_error_stub_names_the_renamed_crate() {
    let input: DeriveInput = parse_quote! {
        #[derive(DeriveEntityModel, Serialize, Observed)]
        #[sea_orm(table_name = "tags")]
        #[observe(crate = "crate::reexport::vo", evnt = "tag")]
        pub struct Model {
            #[sea_orm(primary_key)]
            pub id: i32,
        }
    };
    let out = crate::expand::derive(&input).to_string();
    assert!(
        out.contains("impl crate :: reexport :: vo :: __private :: sea_orm :: ActiveModelBehavior"),
        "{out}"
    );
    assert!(!out.contains(":: vendora_observe ::"), "{out}");
}

#[test]
fn order_for_its_store_and_its_cashier() {
    insta::assert_snapshot!(pretty(parse_quote! {
        #[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Observed)]
        #[sea_orm(table_name = "orders")]
        #[observe(event = "order", watch = "status", room = "store:{store_id}", rooms_with = "crate::cashier_rooms")]
        pub struct Model {
            #[sea_orm(primary_key)]
            pub id: i32,
            pub store_id: i32,
            pub cashier: Option<String>,
            pub status: String,
        }
    }));
}
