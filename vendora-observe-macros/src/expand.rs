//! Generation: the entity's `ActiveModelBehavior` impl.

use proc_macro2::TokenStream;
use quote::{quote, quote_spanned};
use syn::{Data, DeriveInput, Fields};

use crate::ast::Model;
use crate::attr;
use crate::valid::{self, Piece, Spec};

/// The derive's output: the expansion, or every error plus a stub impl.
pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    match expand(input) {
        Ok(tokens) => tokens,
        Err(error) => {
            let errors = error.to_compile_error();
            let stub = stub(input);
            quote!(#errors #stub)
        }
    }
}

/// Expands `#[derive(Observed)]` on `input`.
pub fn expand(input: &DeriveInput) -> syn::Result<TokenStream> {
    // `#[sea_orm::model]` copies the Model's derives onto `ModelEx`; the impl belongs to
    // the entity once, so the copy expands to nothing.
    if input.ident == "ModelEx" {
        return Ok(TokenStream::new());
    }
    let model = Model::from_input(input)?;
    let mut errors = Vec::new();
    let attrs = attr::parse(&input.attrs, &mut errors);
    let spec = valid::check(&model, attrs, &mut errors);
    match (spec, combine(errors)) {
        (Some(spec), None) => Ok(generate(&spec)),
        (_, Some(error)) => Err(error),
        (None, None) => Err(syn::Error::new(input.ident.span(), "invalid #[observe]")),
    }
}

fn combine(errors: Vec<syn::Error>) -> Option<syn::Error> {
    errors.into_iter().reduce(|mut a, b| {
        a.combine(b);
        a
    })
}

/// On an attribute error, an empty `ActiveModelBehavior` keeps SeaORM's own derives from
/// adding "ActiveModelBehavior is not implemented" to the real message. It names the
/// runtime through `crate = "…"` when that key could be read.
fn stub(input: &DeriveInput) -> TokenStream {
    let is_named_struct =
        matches!(&input.data, Data::Struct(s) if matches!(s.fields, Fields::Named(_)));
    if !is_named_struct || input.ident == "ModelEx" {
        return TokenStream::new();
    }
    let krate = attr::parse(&input.attrs, &mut Vec::new())
        .krate
        .unwrap_or_else(|| syn::parse_quote!(::vendora_observe));
    quote! {
        impl #krate::__private::sea_orm::ActiveModelBehavior for ActiveModel {}
    }
}

fn generate(spec: &Spec) -> TokenStream {
    let krate = &spec.krate;
    let model = spec.model.ident;
    let entity_event = &spec.event;
    let latest_wins = spec.latest_wins;
    let pk = &spec.primary_key;
    let pk_idents: Vec<_> = pk.iter().map(|f| f.ident).collect();
    let pk_types: Vec<_> = pk.iter().map(|f| f.ty).collect();
    let pk_names: Vec<String> = pk.iter().map(|f| f.ident.to_string()).collect();

    // The primary key of an ActiveModel (None when a part is NotSet), the ordering key of
    // a Model, and the `{"id": …}` payload.
    let (pk_type, active_pk, model_key, id_value) = if pk.len() == 1 {
        let (id, ty) = (pk_idents[0], pk_types[0]);
        (
            quote!(#ty),
            quote!(::core::option::Option::Some(am.#id.try_as_ref()?.clone())),
            quote!(__vo::key_string(&model.#id)),
            quote!(__vo::to_value(&__pk)),
        )
    } else {
        let idx = (0..pk.len()).map(syn::Index::from);
        (
            quote!((#(#pk_types),*)),
            quote!(::core::option::Option::Some((#(am.#pk_idents.try_as_ref()?.clone()),*))),
            quote!(__vo::key_string(&(#(&model.#pk_idents),*))),
            quote!(__vo::object([#((#pk_names, __vo::to_value(&__pk.#idx))),*])),
        )
    };
    let model_id_value = if pk.len() == 1 {
        let id = pk_idents[0];
        quote!(__vo::to_value(&model.#id))
    } else {
        quote!(__vo::object([#((#pk_names, __vo::to_value(&model.#pk_idents))),*]))
    };

    let call_user = |hook: TokenStream| {
        if spec.hooks { hook } else { TokenStream::new() }
    };
    let user_new = call_user(quote! {
        fn new() -> Self {
            <Self as __vo::ActiveModelHooks>::new()
        }
    });
    let user_before_save = call_user(quote! {
        let am = <Self as __vo::ActiveModelHooks>::before_save(am, db, insert).await?;
    });
    let user_after_save = call_user(quote! {
        let model = <Self as __vo::ActiveModelHooks>::after_save(model, db, insert).await?;
    });
    let user_before_delete = call_user(quote! {
        let am = <Self as __vo::ActiveModelHooks>::before_delete(am, db).await?;
    });
    let user_after_delete = call_user(quote! {
        let am = <Self as __vo::ActiveModelHooks>::after_delete(am, db).await?;
    });

    // Rooms: from the model, by the `room` templates and the `rooms_with` function.
    let targeted = spec.targeted();
    let room_fields = spec.room_fields();
    let rooms_of = if targeted {
        let templates = spec.rooms.iter().map(|pieces| {
            let parts = pieces.iter().map(|p| match p {
                Piece::Text(t) => quote!(__vo::RoomPiece::Text(#t)),
                Piece::Field(f) => {
                    let f = f.ident;
                    quote!(__vo::RoomPiece::Value(__vo::to_value(&model.#f)))
                }
            });
            quote!(__vo::push_room(&mut __r, &[#(#parts),*]);)
        });
        let with = spec.rooms_with.as_ref().map(|path| {
            quote_spanned! {syn::spanned::Spanned::span(path)=>
                __r.extend(
                    ::core::iter::IntoIterator::into_iter(#path(model))
                        .map(::core::convert::Into::<::std::string::String>::into),
                );
            }
        });
        quote! {
            fn __rooms_of(model: &#model) -> ::std::vec::Vec<::std::string::String> {
                let mut __r: ::std::vec::Vec<::std::string::String> = ::std::vec::Vec::new();
                #(#templates)*
                #with
                __r
            }
        }
    } else {
        TokenStream::new()
    };

    // The stored row, read in before_save when a watched column or a field of a room
    // template is Set. Inside a transaction the read locks the row (PostgreSQL, MySQL:
    // `FOR UPDATE`; SQLite has one writer), so concurrent writers of one row each see the
    // value they change; the rooms the row leaves are told of its move.
    let reads_old = !spec.watch.is_empty() || !room_fields.is_empty();
    let stash_type = quote!((::core::option::Option<#model>, u64, bool));
    let lock_in_transaction = quote! {
        let __query = <Entity as __vo::sea_orm::EntityTrait>::find_by_id(__pk);
        let __query = if __vo::is_autocommit::<C>() {
            __query
        } else {
            __vo::sea_orm::QuerySelect::lock_exclusive(__query)
        };
    };
    let watch_read = if !reads_old {
        TokenStream::new()
    } else {
        let bits = spec.watch.iter().enumerate().map(|(i, w)| {
            let f = w.field.ident;
            quote!(if am.#f.is_set() { __mask |= 1u64 << #i; })
        });
        let room_idents = room_fields.iter().map(|f| f.ident);
        quote! {
            if !insert && __vo::listening(&__ENTITY) {
                if let ::core::option::Option::Some(__pk) = __active_pk(&am) {
                    let __key = __vo::key_string(&__pk);
                    let mut __mask: u64 = 0;
                    #(#bits)*
                    let __moved = false #(|| am.#room_idents.is_set())*;
                    if __mask == 0 && !__moved {
                        __vo::discard_stash::<Entity>(&__key);
                    } else {
                        #lock_in_transaction
                        match __query.one(db).await {
                            ::core::result::Result::Ok(::core::option::Option::Some(__old)) => {
                                __vo::stash::<Entity, #stash_type>(__key, (::core::option::Option::Some(__old), __mask, __moved));
                            }
                            // No such row: the update itself will fail.
                            ::core::result::Result::Ok(::core::option::Option::None) => {
                                __vo::discard_stash::<Entity>(&__key);
                            }
                            ::core::result::Result::Err(__e) => {
                                __vo::warn_old_value_unread(#entity_event, &__key, &__e);
                                __vo::stash::<Entity, #stash_type>(__key, (::core::option::Option::None, __mask, __moved));
                            }
                        }
                    }
                }
            }
        }
    };
    // Not listening: drop what before_save may have kept (an observer went away between
    // the hooks).
    let discard_stash = if !reads_old {
        TokenStream::new()
    } else {
        quote! {
            else if !insert {
                let _ = __vo::take_stash::<Entity, #stash_type>(&#model_key);
            }
        }
    };
    let old_value_events = if !reads_old {
        TokenStream::new()
    } else {
        let id_key = &spec.id_key;
        let checks = spec.watch.iter().enumerate().map(|(i, w)| {
            let f = w.field.ident;
            let event = &w.event;
            let value_key = &w.value_key;
            quote! {
                if __mask & (1u64 << #i) != 0
                    && __old.as_ref().is_none_or(|__old| __old.#f != model.#f)
                {
                    __events.push((#event, __vo::EventKind::Watch, __vo::object([
                        (#id_key, #model_id_value),
                        (#value_key, __vo::to_value(&model.#f)),
                    ])));
                }
            }
        });
        let moved_from = (!room_fields.is_empty()).then(|| {
            quote! {
                if __moved && let ::core::option::Option::Some(__old) = &__old {
                    __rooms.extend(__rooms_of(__old));
                }
            }
        });
        quote! {
            if let ::core::option::Option::Some((__old, __mask, __moved)) =
                __vo::take_stash::<Entity, #stash_type>(&__key)
            {
                #(#checks)*
                #moved_from
            }
        }
    };
    let (rooms_new, rooms_arg) = if targeted {
        (
            quote!(let mut __rooms = __rooms_of(&model);),
            quote!(::core::option::Option::Some(__rooms)),
        )
    } else {
        (TokenStream::new(), quote!(::core::option::Option::None))
    };

    let created_event = format!("{entity_event}:created");
    let updated_event = format!("{entity_event}:updated");
    let deleted_event = format!("{entity_event}:deleted");
    // Spanned at the struct's name: without `Serialize`, the error points there (and the
    // two identical diagnostics are reported once).
    let model_value = quote_spanned!(model.span()=> __vo::model_value::<#model>(&model));
    let on_created = spec
        .created
        .then(|| quote!(__events.push((#created_event, __vo::EventKind::Created, #model_value));));
    let on_updated = spec
        .updated
        .then(|| quote!(__events.push((#updated_event, __vo::EventKind::Updated, #model_value));));
    // A targeted delete needs the row's rooms: from the ActiveModel when it holds the whole
    // row (`Model::delete`), else read in before_delete, in the delete's transaction.
    let rooms_before_delete = if targeted && spec.deleted {
        quote! {
            if __vo::listening(&__ENTITY) {
                if let ::core::option::Option::Some(__pk) = __active_pk(&am) {
                    let __key = __vo::key_string(&__pk);
                    let __rooms = match __vo::sea_orm::TryIntoModel::<#model>::try_into_model(am.clone()) {
                        ::core::result::Result::Ok(__row) => ::core::option::Option::Some(__rooms_of(&__row)),
                        ::core::result::Result::Err(_) => {
                            #lock_in_transaction
                            // Without its rooms the event could reach no app it should: a
                            // failed read fails the delete, which has not happened yet.
                            __query.one(db).await?.map(|__row| __rooms_of(&__row))
                        }
                    };
                    __vo::stash::<Entity, __vo::DeleteRooms>(__key, __vo::DeleteRooms(__rooms));
                }
            }
        }
    } else {
        TokenStream::new()
    };
    let on_deleted = if !spec.deleted {
        TokenStream::new()
    } else if targeted {
        quote! {
            match __active_pk(&am) {
                ::core::option::Option::Some(__pk) if __vo::listening(&__ENTITY) => {
                    let __key = __vo::key_string(&__pk);
                    let __rooms = match __vo::take_stash::<Entity, __vo::DeleteRooms>(&__key) {
                        ::core::option::Option::Some(__vo::DeleteRooms(__rooms)) => __rooms,
                        // The observer came between the hooks.
                        ::core::option::Option::None => {
                            __vo::sea_orm::TryIntoModel::<#model>::try_into_model(am.clone())
                                .ok()
                                .map(|__row| __rooms_of(&__row))
                        }
                    };
                    match __rooms {
                        ::core::option::Option::Some(__rooms) => {
                            let __events: ::std::vec::Vec<__vo::Emission> =
                                ::std::vec![(#deleted_event, __vo::EventKind::Deleted, __vo::object([("id", #id_value)]))];
                            __vo::emit(db, &__ENTITY, &__key, __events, ::core::option::Option::Some(__rooms)).await?;
                        }
                        ::core::option::Option::None => __vo::note_delete_without_row(#entity_event, &__key),
                    }
                }
                ::core::option::Option::Some(_) => {}
                ::core::option::Option::None => __vo::warn_delete_without_key(#entity_event),
            }
        }
    } else {
        quote! {
            match __active_pk(&am) {
                ::core::option::Option::Some(__pk) => {
                    let __key = __vo::key_string(&__pk);
                    let __events: ::std::vec::Vec<__vo::Emission> =
                        ::std::vec![(#deleted_event, __vo::EventKind::Deleted, __vo::object([("id", #id_value)]))];
                    __vo::emit(db, &__ENTITY, &__key, __events, ::core::option::Option::None).await?;
                }
                ::core::option::Option::None => __vo::warn_delete_without_key(#entity_event),
            }
        }
    };

    quote! {
        #[doc(hidden)]
        #[allow(clippy::all, unused_mut, unused_variables)]
        const _: () = {
            use #krate::__private as __vo;

            static __ENTITY: __vo::EntityInfo = __vo::EntityInfo {
                event: #entity_event,
                latest_wins: #latest_wins,
            };

            fn __active_pk(am: &ActiveModel) -> ::core::option::Option<#pk_type> {
                #active_pk
            }

            #rooms_of

            #[automatically_derived]
            #[__vo::async_trait]
            impl __vo::sea_orm::ActiveModelBehavior for ActiveModel {
                #user_new

                async fn before_save<C>(self, db: &C, insert: bool)
                    -> ::core::result::Result<Self, __vo::sea_orm::DbErr>
                where
                    C: __vo::sea_orm::ConnectionTrait,
                {
                    __vo::expect_write::<Entity>();
                    let am = self;
                    #user_before_save
                    #watch_read
                    ::core::result::Result::Ok(am)
                }

                async fn after_save<C>(model: #model, db: &C, insert: bool)
                    -> ::core::result::Result<#model, __vo::sea_orm::DbErr>
                where
                    C: __vo::sea_orm::ConnectionTrait,
                {
                    #user_after_save
                    if __vo::listening(&__ENTITY) {
                        let __key = #model_key;
                        let mut __events: ::std::vec::Vec<__vo::Emission> = ::std::vec::Vec::new();
                        #rooms_new
                        if insert {
                            #on_created
                        } else {
                            #on_updated
                            #old_value_events
                        }
                        __vo::emit(db, &__ENTITY, &__key, __events, #rooms_arg).await?;
                    } #discard_stash
                    ::core::result::Result::Ok(model)
                }

                async fn before_delete<C>(self, db: &C)
                    -> ::core::result::Result<Self, __vo::sea_orm::DbErr>
                where
                    C: __vo::sea_orm::ConnectionTrait,
                {
                    __vo::expect_write::<Entity>();
                    let am = self;
                    #user_before_delete
                    #rooms_before_delete
                    ::core::result::Result::Ok(am)
                }

                async fn after_delete<C>(self, db: &C)
                    -> ::core::result::Result<Self, __vo::sea_orm::DbErr>
                where
                    C: __vo::sea_orm::ConnectionTrait,
                {
                    let am = self;
                    #user_after_delete
                    #on_deleted
                    ::core::result::Result::Ok(am)
                }
            }
        };
    }
}
