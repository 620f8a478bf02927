//! The playground page in a real headless browser (Debian's `chromium` and
//! `chromium-driver`, driven over WebDriver): it draws, rates, asks,
//! corrects, shows a job's gate numbers and curves, and rolls back a
//! version; each action is checked in the store through the API.
//!
//! Without a `chromedriver` on the PATH (or in `ULM_CHROMEDRIVER`) the test
//! says so and passes, unless `ULM_REQUIRE_BROWSER` is set, as in CI. With
//! `ULM_SCREENSHOTS=<dir>` it saves the screenshots the README shows.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use ulm_e2e::{job_finished, png_base64, skip_unless_required, Server, ADMIN_KEY, USER_KEY};
use ulm_world::{examples, Split};

fn chromedriver() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ULM_CHROMEDRIVER") {
        return Some(path.into());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("chromedriver"))
        .find(|p| p.is_file())
}

/// chromedriver on a free port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(binary: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver) -> Client {
    let mut options = json!({"args": [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--window-size=1360,1500", "--force-device-scale-factor=1",
    ]});
    if Path::new("/usr/bin/chromium").is_file() {
        options["binary"] = json!("/usr/bin/chromium");
    }
    let mut caps = serde_json::Map::new();
    caps.insert("goog:chromeOptions".into(), options);
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session")
}

/// Polls `probe` (a JavaScript expression) until it is truthy.
async fn wait_for(page: &Client, what: &str, probe: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let value = page
            .execute(&format!("return {probe};"), vec![])
            .await
            .expect("script");
        let truthy = match &value {
            Value::Null | Value::Bool(false) => false,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if truthy {
            return value;
        }
        if Instant::now() > deadline {
            let status = page
                .execute("return [document.querySelector('header').innerText, ...[...document.querySelectorAll('.status')].map(s => s.textContent)].join(' | ');", vec![])
                .await
                .unwrap_or_default();
            panic!("waiting for {what}: {probe} (page says: {status})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fill(page: &Client, id: &str, text: &str) {
    let field = page.find(Locator::Id(id)).await.expect(id);
    field.clear().await.unwrap();
    field.send_keys(text).await.unwrap();
}

async fn click(page: &Client, css: &str) {
    page.find(Locator::Css(css))
        .await
        .expect(css)
        .click()
        .await
        .unwrap();
}

async fn screenshot(page: &Client, name: &str) {
    let Some(dir) = std::env::var_os("ULM_SCREENSHOTS") else {
        return;
    };
    let png = page.screenshot().await.expect("screenshot");
    std::fs::write(Path::new(&dir).join(name), png).unwrap();
}

async fn feedback_of(server: &Server, sample: &str) -> Vec<Value> {
    let (status, body) = server.get(&format!("/v1/samples/{sample}")).await;
    assert_eq!(status, 200, "{body}");
    body["feedback"].as_array().unwrap().clone()
}

/// Rated answers enough for a short job to train and be judged on.
async fn rated_answers(server: &Server) {
    for i in 0..8u32 {
        let body = json!({
            "image": png_base64(32 + i, 24), "question": format!("What is in picture {i}?"),
            "n": 4, "max_new_tokens": 6, "seed": 100 * i,
        });
        let (status, answer) = server.post("/v1/answer", &body).await;
        assert_eq!(status, 200, "{answer}");
        for (k, sample) in answer["samples"].as_array().unwrap().iter().enumerate() {
            let rating =
                json!({"sample_id": sample["sample_id"], "key": "quality", "score": k % 2});
            assert_eq!(server.post("/v1/feedback", &rating).await.0, 201);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_playground_draws_asks_rates_and_rolls_back() {
    let Some(binary) = chromedriver() else {
        return skip_unless_required(
            "ULM_REQUIRE_BROWSER",
            "there is no chromedriver (apt-get install chromium chromium-driver)",
        );
    };
    let keys = format!("user:{USER_KEY},admin:{ADMIN_KEY}");
    // The built-in world model: what a user who opens the page first sees.
    let mut server =
        Server::start_default(&["--api-keys", &keys, "--rl-holdout-fraction", "0.4"]).await;
    server.key = Some(ADMIN_KEY.into());
    let driver = Driver::start(&binary);
    let page = browser(&driver).await;
    page.goto(&server.url("/")).await.unwrap();

    // Without a key the page says what is wrong; with one it shows the model.
    wait_for(
        &page,
        "the missing key",
        "document.getElementById('admin-status').textContent.includes('unauthorized')",
    )
    .await;
    fill(&page, "api-key", USER_KEY).await;
    click(&page, "h1").await;
    wait_for(
        &page,
        "the active version",
        "document.getElementById('active-version').textContent === 'base'",
    )
    .await;

    // Draw four images and rate the first.
    fill(&page, "prompt", "a photo of a red circle and a blue square").await;
    fill(&page, "images-n", "4").await;
    fill(&page, "gen-seed", "7").await;
    click(&page, "#generate").await;
    wait_for(
        &page,
        "four images",
        "document.querySelectorAll('#images figure img').length === 4",
    )
    .await;
    click(&page, "#images figure:first-child button.up").await;
    let rated = wait_for(
        &page,
        "the rating",
        "document.querySelector('#images figure:first-child button.up').getAttribute('aria-pressed') === 'true' && document.querySelector('#images figure:first-child').dataset.sample",
    )
    .await;
    let rated = rated.as_str().unwrap();
    let stored = feedback_of(&server, rated).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["key"], "quality");
    assert_eq!(stored[0]["score"], 1.0);
    assert_eq!(stored[0]["source"]["type"], "human");
    screenshot(&page, "playground-generate.png").await;

    // Ask about an uploaded image, rate one answer down and correct it.
    let tmp = tempfile::tempdir().unwrap();
    let upload = tmp.path().join("scene.png");
    let scene = examples(0, Split::Test).next().unwrap();
    scene.image(192).save(&upload).unwrap();
    page.find(Locator::Id("ask-image"))
        .await
        .unwrap()
        .send_keys(upload.to_str().unwrap())
        .await
        .unwrap();
    wait_for(
        &page,
        "the preview",
        "document.getElementById('preview').style.display === 'block'",
    )
    .await;
    fill(&page, "question", &scene.questions[0].text).await;
    fill(&page, "answers-n", "3").await;
    click(&page, "#ask").await;
    wait_for(
        &page,
        "three answers",
        "document.querySelectorAll('#answers li').length === 3",
    )
    .await;
    click(&page, "#answers li:first-child button.down").await;
    wait_for(&page, "the answer's rating", "document.querySelector('#answers li:first-child button.down').getAttribute('aria-pressed') === 'true'").await;
    let field = page
        .find(Locator::Css("#answers li:first-child input.correction"))
        .await
        .unwrap();
    field.send_keys(&scene.questions[0].answer).await.unwrap();
    click(&page, "#answers li:first-child button.send-correction").await;
    wait_for(
        &page,
        "the correction",
        "document.getElementById('ask-status').textContent.includes('correction stored')",
    )
    .await;
    let answered = page
        .execute(
            "return document.querySelector('#answers li:first-child').dataset.sample;",
            vec![],
        )
        .await
        .unwrap();
    let stored = feedback_of(&server, answered.as_str().unwrap()).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(stored
        .iter()
        .any(|f| f["key"] == "correct" && f["score"] == 0.0 && f["correction"].is_null()));
    assert!(stored
        .iter()
        .any(|f| f["correction"] == scene.questions[0].answer.as_str()));
    screenshot(&page, "playground-ask.png").await;

    // A user key cannot see jobs; the page says so.
    wait_for(
        &page,
        "the forbidden jobs",
        "document.getElementById('admin-status').textContent.includes('forbidden')",
    )
    .await;

    // An admin sees a short job's gate numbers and curves, then rolls back.
    rated_answers(&server).await;
    let config = json!({"steps": 4, "lr": 2e-4, "max_kl": 1e6, "max_reward_drop": 1e6});
    let (status, job) = server.post("/v1/rl/jobs", &config).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let job = server.wait_job(&id, job_finished).await;
    assert_eq!(job["status"], "promoted", "{job}");
    fill(&page, "api-key", ADMIN_KEY).await;
    click(&page, "h1").await;
    wait_for(
        &page,
        "the new version",
        "document.getElementById('active-version').textContent === 'v1'",
    )
    .await;
    wait_for(&page, "the job's row", "document.querySelector('#jobs tbody tr .pill') && document.querySelector('#jobs tbody tr .pill').textContent === 'promoted'").await;
    wait_for(&page, "the curves", "document.querySelector('#curves img') && document.querySelector('#curves img').naturalWidth === 1120").await;
    let gate = page
        .execute("return [...document.querySelectorAll('#jobs tbody tr:first-child td.num')].map(c => c.textContent);", vec![])
        .await
        .unwrap();
    let gate: Vec<&str> = gate
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(gate.len(), 3);
    assert!(
        gate.iter().all(|v| v.parse::<f64>().is_ok()),
        "gate numbers: {gate:?}"
    );
    screenshot(&page, "playground-admin.png").await;
    click(&page, "#versions tr[data-version='base'] button.activate").await;
    wait_for(
        &page,
        "the rollback",
        "document.getElementById('active-version').textContent === 'base'",
    )
    .await;
    assert_eq!(server.active_version().await, "base");

    page.close().await.unwrap();
    server.stop();
}
