//! Access control, generated from the route table: every route is called as
//! anonymous, agent, viewer, operator and admin (protocol.md §3, §15).

use tether_client::{Client, Credentials};
use tether_proto::user::{CreateApiToken, CreateUser, UpdateUser};
use tether_server::api::{Access, ROUTES};

use crate::common::{TestApp, spawn_app};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Anonymous,
    Agent,
    Viewer,
    Operator,
    Admin,
}

const CALLERS: [Caller; 5] = [Caller::Anonymous, Caller::Agent, Caller::Viewer, Caller::Operator, Caller::Admin];

/// What the table promises: 401 for the wrong kind of credential, 403 for
/// too small a role, anything else (200, 204, 400, 404 …) when admitted.
fn expected(access: Access, caller: Caller) -> Option<u16> {
    use Caller::*;
    match (access, caller) {
        (Access::Public, _) => None,
        (Access::Agent, Agent) => None,
        (Access::Agent, _) => Some(401),
        (_, Anonymous | Agent) => Some(401),
        (Access::AnyUser | Access::Viewer, _) => None,
        (Access::Operator, Viewer) => Some(403),
        (Access::Operator, _) => None,
        (Access::Admin, Admin) => None,
        (Access::Admin, _) => Some(403),
    }
}

async fn user_token(app: &TestApp, username: &str, role: &str) -> String {
    let password = format!("{username}-password-long");
    app.admin
        .create_user(&CreateUser { username: username.into(), password: password.clone(), role: role.into() })
        .await
        .expect("create user");
    let basic = Client::new(&app.base)
        .expect("client")
        .with_credentials(Credentials::Basic { username: username.into(), password });
    basic.create_api_token(&CreateApiToken { name: "test".into(), expires_in_s: None }).await.expect("token").token
}

#[tokio::test]
async fn every_route_admits_exactly_the_callers_its_table_row_names() {
    let app = spawn_app().await;
    let (_, agent) = app.agent(&[]).await;
    let viewer = user_token(&app, "vera", "viewer").await;
    let operator = user_token(&app, "otto", "operator").await;
    let http = app.http();
    let mut checked = 0;
    for route in ROUTES {
        let path = route.path.replace("{id}", &uuid_like());
        for caller in CALLERS {
            let token = match caller {
                Caller::Anonymous => None,
                Caller::Agent => Some(agent.access_token.as_str()),
                Caller::Viewer => Some(viewer.as_str()),
                Caller::Operator => Some(operator.as_str()),
                Caller::Admin => Some(app.admin_token.as_str()),
            };
            let method = reqwest::Method::from_bytes(route.method.to_ascii_uppercase().as_bytes()).expect("method");
            let mut req = http.request(method.clone(), app.url(&path));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if method != reqwest::Method::GET && method != reqwest::Method::DELETE {
                req = req.header("content-type", "application/json").body("{}");
            }
            let status = req.send().await.expect("send").status().as_u16();
            match expected(route.access, caller) {
                Some(want) => assert_eq!(status, want, "{} {} as {caller:?}", route.method, route.path),
                None => assert!(
                    status != 401 && status != 403 && status != 500,
                    "{} {} as {caller:?} got {status}",
                    route.method,
                    route.path
                ),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, ROUTES.len() * CALLERS.len());
    // Denials are audited.
    let rows = app.state.store.list_audit(0, 10_000).await.expect("audit");
    assert!(rows.iter().any(|r| r.action == "rbac.denied" && r.actor == "vera"));
    app.stop().await;
}

fn uuid_like() -> String {
    tether_proto::CommandId::new().to_string()
}

#[tokio::test]
async fn role_changes_and_user_deletion_take_effect_on_the_next_request() {
    let app = spawn_app().await;
    let token = user_token(&app, "carol", "viewer").await;
    let carol = Client::new(&app.base).expect("client").with_bearer(token);
    let err = carol
        .create_command(&tether_proto::command::CreateCommand::new(tether_proto::command::Target::all(), "ping"))
        .await
        .expect_err("viewer");
    assert_eq!(err.status(), Some(403));
    let id =
        app.admin.list_users().await.expect("users").into_iter().find(|u| u.username == "carol").expect("carol").id;
    app.admin.update_user(&id, &UpdateUser { role: Some("operator".into()), password: None }).await.expect("promote");
    carol
        .create_command(&tether_proto::command::CreateCommand::new(tether_proto::command::Target::all(), "ping"))
        .await
        .expect("operator now");
    app.admin.delete_user(&id).await.expect("delete");
    assert_eq!(carol.list_agents(&Default::default()).await.expect_err("deleted").status(), Some(401));
    // Weak passwords and unknown roles are refused, naming the field.
    let err = app
        .admin
        .create_user(&CreateUser { username: "x".into(), password: "short".into(), role: "viewer".into() })
        .await
        .expect_err("weak");
    assert_eq!(err.status(), Some(400));
    let err = app
        .admin
        .create_user(&CreateUser { username: "y".into(), password: "long-enough-password".into(), role: "root".into() })
        .await
        .expect_err("role");
    assert_eq!(err.status(), Some(400));
    app.stop().await;
}
