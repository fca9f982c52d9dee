// Drives sandrun's web UI in Debian's headless chromium (playwright-core, no downloaded browser).
// Started by tests/tests/browser_ui.rs against real daemons; runnable by hand too:
//
//   SANDRUN_URL=https://127.0.0.1:PORT SANDRUN_QUOTA_URL=https://127.0.0.1:PORT2 node ui.mjs
//
// SANDRUN_QUOTA_URL is a gateway whose client may submit one job per hour (jobs_per_hour = 1).
// Every scenario runs in a fresh browser context; a failing one saves a screenshot to
// SCREENSHOT_DIR (default target/browser-screenshots/ of the workspace; with SCREENSHOT_ALL=1
// every scenario leaves one of its final state there). Any console error or
// uncaught page error fails the run. The last line is a JSON summary; the exit code is 0 only
// when every scenario passed.

import { chromium } from "playwright-core";
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { gunzipSync } from "node:zlib";
import { execFileSync } from "node:child_process";

const here = dirname(fileURLToPath(import.meta.url));
const BASE = need("SANDRUN_URL");
const QUOTA_BASE = need("SANDRUN_QUOTA_URL");
const SHOTS = process.env.SCREENSHOT_DIR || join(here, "..", "..", "target", "browser-screenshots");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const WAIT = 90_000;

function need(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`${name} is not set`);
    process.exit(2);
  }
  return value.replace(/\/+$/, "");
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

/** Chromium's own log line for a fetch answered with `status`: expected where a scenario provokes
 * an API error on purpose (the page's code logs nothing). */
const NETWORK_LOG = (status) =>
  new RegExp(`^Failed to load resource: the server responded with a status of ${status} \\(\\)$`);

/** A 1x1 PNG, written by a job and previewed as an image. */
const PNG_B64 =
  "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYPj/HwADAgH/6m7JFAAAAABJRU5ErkJggg==";

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ["--no-sandbox"],
});
const results = [];
const consoleErrors = [];

async function scenario(name, fn, { viewport, base = BASE, allowConsole = [] } = {}) {
  const context = await browser.newContext({
    ignoreHTTPSErrors: true,
    acceptDownloads: true,
    viewport: viewport || { width: 1280, height: 900 },
  });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on("console", (msg) => {
    if (msg.type() !== "error") return;
    const text = msg.text();
    if (allowConsole.some((re) => re.test(text))) return;
    consoleErrors.push(`${name}: console error: ${text}`);
  });
  page.on("pageerror", (err) => consoleErrors.push(`${name}: page error: ${err.message}`));
  const started = Date.now();
  try {
    const response = await page.goto(`${base}/`);
    check(response.ok(), `GET / answered ${response.status()}`);
    check((await page.title()) === "sandrun", "GET / for a browser is not the UI page");
    await fn(page);
    if (process.env.SCREENSHOT_ALL) {
      mkdirSync(SHOTS, { recursive: true });
      await page.screenshot({ path: join(SHOTS, `${name}-done.png`), fullPage: true });
    }
    results.push({ name, ok: true, ms: Date.now() - started });
    console.log(`ok - ${name}`);
  } catch (err) {
    mkdirSync(SHOTS, { recursive: true });
    const shot = join(SHOTS, `${name}.png`);
    await page.screenshot({ path: shot, fullPage: true }).catch(() => {});
    results.push({ name, ok: false, error: String(err && err.stack ? err.stack : err), screenshot: shot });
    console.log(`not ok - ${name}: ${err && err.message} (screenshot ${shot})`);
  } finally {
    await context.close();
  }
}

/** Replaces the editor's text (fill, so the key handlers do not re-indent it). */
async function setCode(page, code) {
  await page.fill("#code", code);
}

async function openOptions(page) {
  const open = await page.$eval("#options", (d) => d.open);
  if (!open) await page.click("#options summary");
}

/** Waits for the job on the page to end. Every Run shows "submitting" at once, so a status left
 * from an earlier job on the same page is never taken for this one's. */
async function waitFinished(page) {
  await page.waitForFunction(
    () => ["completed", "failed"].includes(document.getElementById("status").textContent),
  );
  return page.textContent("#status");
}

async function consoleText(page, cls) {
  return page.$$eval(`#console .${cls}`, (spans) => spans.map((s) => s.textContent).join(""));
}

/** Clicks a button that saves a file and returns the saved bytes. */
async function downloadBytes(page, selector) {
  const [download] = await Promise.all([page.waitForEvent("download"), page.click(selector)]);
  const path = await download.path();
  return { name: download.suggestedFilename(), bytes: readFileSync(path) };
}

// ------------------------------------------------------------------------------- scenarios

await scenario("python_output_arrives_live_and_outputs_download", async (page) => {
  await setCode(
    page,
    [
      "import base64, sys, time",
      'open("result.txt", "wb").write(bytes(range(256)) + b"sandrun\\n")',
      `open("dot.png", "wb").write(base64.b64decode("${PNG_B64}"))`,
      'print("first line", flush=True)',
      'print("to stderr", file=sys.stderr, flush=True)',
      `print('<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>', flush=True)`,
      "time.sleep(3)",
      'print("second line")',
      "",
    ].join("\n"),
  );
  await openOptions(page);
  await page.fill("#outputs", "*.txt, *.png");
  await page.click("#run");
  // Live: the first line is shown while the job is still running, before the second exists.
  await page.waitForFunction(() => document.getElementById("console").textContent.includes("first line"));
  const live = await page.evaluate(() => ({
    status: document.getElementById("status").textContent,
    text: document.getElementById("console").textContent,
  }));
  check(["queued", "running"].includes(live.status), `status was ${live.status} when the first line arrived`);
  check(!live.text.includes("second line"), "the second line arrived together with the first: not live");
  check((await waitFinished(page)) === "completed", "the job did not complete");
  check((await consoleText(page, "stdout")).includes("second line"), "stdout lacks the second line");
  check((await consoleText(page, "stderr")).includes("to stderr"), "stderr is not shown as stderr");
  // Job output is text, never markup.
  check((await consoleText(page, "stdout")).includes('<img src=x onerror="window.pwned=1">'), "markup not shown as text");
  check((await page.evaluate(() => window.pwned)) === undefined && !(await page.$("#console img")), "job output became markup");
  const [outColor, errColor] = await page.evaluate(() =>
    [".stdout", ".stderr"].map((c) => getComputedStyle(document.querySelector(`#console ${c}`)).color),
  );
  check(outColor !== errColor, "stdout and stderr have the same colour");
  check((await page.textContent("#exit-code")) === "0", "exit code is not 0");
  for (const id of ["#cpu-time", "#memory-peak", "#wall-time"]) {
    check((await page.textContent(id)) !== "–", `${id} is not shown`);
  }
  // Outputs: listed, previewed (text and image), downloaded with their exact bytes.
  await page.waitForSelector('#output-list li[data-name="result.txt"]');
  const expected = Buffer.concat([Buffer.from([...Array(256).keys()]), Buffer.from("sandrun\n")]);
  const one = await downloadBytes(page, '#output-list li[data-name="result.txt"] button.download');
  check(one.name === "result.txt", `download is named ${one.name}`);
  check(one.bytes.equals(expected), "downloaded result.txt has other bytes than the job wrote");
  await page.click('#output-list li[data-name="dot.png"] button.preview');
  await page.waitForFunction(() => {
    const img = document.querySelector("#preview img");
    return img && img.complete && img.naturalWidth === 1;
  });
  await page.click('#output-list li[data-name="result.txt"] button.preview');
  await page.waitForFunction(() => (document.querySelector("#preview pre") || {}).textContent?.includes("sandrun"));
  // The signature verifies in the browser, and a tampered message or signature does not.
  await page.waitForFunction(() => document.getElementById("verify-result").className !== "");
  const verdict = await page.textContent("#verify-result");
  check(verdict.startsWith("Signature valid"), `signature not verified: ${verdict}`);
  const message = await page.inputValue("#sig-message");
  check(message.includes("output=") && message.includes(" result.txt\n"), "message lacks the outputs");
  await page.fill("#sig-message", message.replace("exit_code=0", "exit_code=1"));
  await page.click("#verify");
  await page.waitForFunction(() => document.getElementById("verify-result").textContent.includes("INVALID"));
  await page.fill("#sig-message", message);
  const signature = await page.inputValue("#sig-value");
  const flipped = Buffer.from(signature, "base64");
  flipped[0] ^= 1;
  await page.fill("#sig-value", flipped.toString("base64"));
  await page.click("#verify");
  await page.waitForFunction(() => document.getElementById("verify-result").textContent.includes("INVALID"));
  await page.fill("#sig-value", signature);
  await page.click("#verify");
  await page.waitForFunction(() => document.getElementById("verify-result").textContent.startsWith("Signature valid"));
  // All at once: a tar.gz holding both outputs; after it the job is gone.
  const all = await downloadBytes(page, "#download-all");
  const tar = gunzipSync(all.bytes);
  check(tar.includes(Buffer.from("result.txt")) && tar.includes(Buffer.from("dot.png")), "tarball lacks the outputs");
  check(tar.includes(expected), "tarball's result.txt has other bytes");
});

await scenario("editor_indents_and_other_languages_run", async (page) => {
  // Typed as a user types: Enter after ":" indents, Enter keeps it, Shift+Tab dedents.
  await setCode(page, "");
  await page.click("#code");
  await page.keyboard.type("for i in range(2):");
  await page.keyboard.press("Enter");
  await page.keyboard.type("x = i * 10");
  await page.keyboard.press("Enter");
  await page.keyboard.type("print(x)");
  await page.keyboard.press("Enter");
  await page.keyboard.press("Shift+Tab");
  await page.keyboard.type('print("end")');
  const typed = await page.inputValue("#code");
  check(typed === 'for i in range(2):\n    x = i * 10\n    print(x)\nprint("end")', `editor holds ${JSON.stringify(typed)}`);
  await page.click("#run");
  check((await waitFinished(page)) === "completed", "the typed Python did not complete");
  check((await consoleText(page, "stdout")) === "0\n10\nend\n", "the typed Python printed something else");
  // Node: choosing the language puts its sample in an empty editor (typed code is kept).
  await page.selectOption("#lang", "node");
  check((await page.inputValue("#code")) === typed, "switching the language threw typed code away");
  await setCode(page, "");
  await page.selectOption("#lang", "python");
  await page.selectOption("#lang", "node");
  check((await page.inputValue("#code")).startsWith("console.log"), "no Node sample");
  await setCode(page, 'console.log("node says", 6 * 7);\n');
  await page.click("#run");
  check((await waitFinished(page)) === "completed", "the Node job did not complete");
  check((await consoleText(page, "stdout")) === "node says 42\n", "the Node job printed something else");
  await page.selectOption("#lang", "shell");
  await setCode(page, 'echo "shell says $((6 * 7))" >&2\nexit 3\n');
  await page.click("#run");
  check((await waitFinished(page)) === "failed", "a shell job exiting 3 is not failed");
  check((await page.textContent("#exit-code")) === "3", "exit code 3 is not shown");
  check((await consoleText(page, "stderr")) === "shell says 42\n", "the shell job's stderr is missing");
});

await scenario("folder_with_job_json_runs", async (page) => {
  const dir = mkdtempSync(join(tmpdir(), "sandrun-ui-"));
  const project = join(dir, "project");
  mkdirSync(join(project, "lib"), { recursive: true });
  writeFileSync(join(project, "job.json"), JSON.stringify({ entrypoint: "main.py", outputs: ["out/"] }));
  writeFileSync(join(project, "lib", "words.py"), 'WORD = "folder ok"\n');
  writeFileSync(
    join(project, "main.py"),
    'import os, sys\nsys.path.insert(0, "lib")\nfrom words import WORD\nos.makedirs("out", exist_ok=True)\n' +
      'open("out/hello.txt", "w").write(WORD + "\\n")\nprint("from folder:", WORD)\n',
  );
  try {
    await page.setInputFiles("#pick-folder", project);
    const listed = await page.textContent("#file-list");
    check(listed.includes("job.json") && listed.includes("lib/words.py"), `upload list: ${listed}`);
    check(!listed.includes("project/"), "the folder's own name was kept in the paths");
    await page.click("#run");
    check((await waitFinished(page)) === "completed", "the folder job did not complete");
    check((await consoleText(page, "stdout")).includes("from folder: folder ok"), "no output from the folder job");
    await page.waitForSelector('#output-list li[data-name="out/hello.txt"]');
    const got = await downloadBytes(page, '#output-list li[data-name="out/hello.txt"] button.download');
    check(got.bytes.equals(Buffer.from("folder ok\n")), "out/hello.txt has other bytes");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

await scenario("dropped_tar_gz_runs", async (page) => {
  // A .tar.gz made by tar(1), dropped on the page as a user drags it from a file manager.
  const dir = mkdtempSync(join(tmpdir(), "sandrun-ui-"));
  try {
    writeFileSync(join(dir, "run.sh"), 'echo "from the archive: $(cat data.txt)"\n');
    writeFileSync(join(dir, "data.txt"), "42");
    execFileSync("tar", ["-czf", join(dir, "job.tar.gz"), "-C", dir, "run.sh", "data.txt"]);
    const archive = readFileSync(join(dir, "job.tar.gz")).toString("base64");
    await page.evaluate((b64) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const transfer = new DataTransfer();
      transfer.items.add(new File([bytes], "job.tar.gz", { type: "application/gzip" }));
      const drop = document.getElementById("drop");
      drop.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
      drop.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
    }, archive);
    await page.waitForFunction(() => document.getElementById("file-list").textContent.includes("job.tar.gz"));
    await page.click("#run");
    check((await waitFinished(page)) === "completed", "the archive job did not complete");
    check((await consoleText(page, "stdout")).includes("from the archive: 42"), "no output from the archive job");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

await scenario("running_job_is_cancelled", async (page) => {
  await setCode(page, 'import time\nprint("started", flush=True)\ntime.sleep(120)\nprint("never")\n');
  await page.click("#run");
  await page.waitForFunction(() => document.getElementById("console").textContent.includes("started"));
  check((await page.textContent("#status")) === "running", "the job is not running");
  await page.click("#cancel");
  check((await waitFinished(page)) === "failed", "a cancelled job is not failed");
  await page.waitForFunction(() => document.getElementById("reason").textContent === "cancelled");
  check(!(await page.textContent("#console")).includes("never"), "the job ran on after cancel");
});

await scenario("api_error_is_shown_as_its_message", async (page) => {
  await openOptions(page);
  await page.fill("#memory", "999999");
  await page.click("#run");
  await page.waitForSelector("#error:not([hidden])");
  const text = await page.textContent("#error");
  check(/^400: manifest\.memory_mb: /.test(text), `error shown: ${text}`);
}, { allowConsole: [NETWORK_LOG(400)] });

await scenario(
  "quota_refusal_is_shown",
  async (page) => {
    await page.waitForFunction(() => document.getElementById("quota").textContent.includes("of 1 jobs"));
    await setCode(page, 'print("the only job")\n');
    await page.click("#run");
    check((await waitFinished(page)) === "completed", "the first job did not complete");
    await page.waitForFunction(() => document.getElementById("quota").textContent.startsWith("quota left: 0 of 1 jobs"));
    await page.click("#run");
    await page.waitForSelector("#error:not([hidden])");
    const text = await page.textContent("#error");
    check(/^429: quota exceeded: jobs_per_hour/.test(text), `error shown: ${text}`);
  },
  { base: QUOTA_BASE, allowConsole: [NETWORK_LOG(429)] },
);

await scenario(
  "phone_screen_has_no_horizontal_overflow",
  async (page) => {
    const overflow = () =>
      page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    check((await overflow()) <= 0, "the empty page overflows");
    await setCode(page, 'print("x" * 400)\nprint("a-very-long-word/" * 30)\n');
    await openOptions(page);
    await page.click("#run");
    check((await waitFinished(page)) === "completed", "the job did not complete");
    await page.waitForFunction(() => document.getElementById("verify-result").className !== "");
    check((await overflow()) <= 0, `the page overflows by ${await overflow()} px after a run`);
  },
  { viewport: { width: 375, height: 667 } },
);

await browser.close();
for (const e of consoleErrors) results.push({ name: "console", ok: false, error: e });
const failed = results.filter((r) => !r.ok);
console.log(JSON.stringify({ passed: results.length - failed.length, failed: failed.length, results }));
process.exit(failed.length ? 1 : 0);
