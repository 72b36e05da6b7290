//! What every mock's API description shares: the spec at `/openapi.json` and Swagger UI at
//! `/docs`, served from the binary (the UI's files are compiled in, no CDN: many networks, and
//! this project's machines, are offline), and the bearer-token security scheme.

use axum::Router;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi;
use utoipa::Modify;
use utoipa_swagger_ui::SwaggerUi;

/// `api` with its description served at `/openapi.json` and Swagger UI at `/docs`.
pub fn served_with_docs(api: Router, doc: OpenApi) -> Router {
    api.merge(SwaggerUi::new("/docs").url("/openapi.json", doc))
}

/// Declares the `bearer` security scheme (`Authorization: Bearer <token>`).
pub struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
