#!/usr/bin/env node
// Drive JupyterLab in headless Debian chromium (playwright-core): open a
// notebook, run its first cell, wait until the page shows the expected
// outputs, save a screenshot. Exit 0 when every expected string appeared,
// 1 otherwise (2 on the hard time limit).
//
// Environment:
//   LAB_URL         notebook URL with token, e.g.
//                   http://127.0.0.1:8888/lab/tree/lab-check.ipynb?token=T
//   LAB_EXPECT      JSON array of strings the first cell's output must show
//                   (default: ["[stdout:0]", …, "[stdout:3]"])
//   LAB_SCREENSHOT  where to save the PNG (default ../artifacts/jupyterlab.png)
//   LAB_TIMEOUT_MS  how long to wait for the outputs after running (90000)
//   CHROMIUM        browser executable (default /usr/bin/chromium)
//
// tests/kernel/test_lab.py starts JupyterLab and runs this script.

'use strict';

const path = require('path');
const fs = require('fs');
const { chromium } = require('playwright-core');

const url = process.env.LAB_URL;
const expect = process.env.LAB_EXPECT
  ? JSON.parse(process.env.LAB_EXPECT)
  : [0, 1, 2, 3].map((i) => `[stdout:${i}]`);
const screenshot = path.resolve(
  process.env.LAB_SCREENSHOT || path.join(__dirname, '..', 'artifacts', 'jupyterlab.png')
);
const outputTimeout = Number(process.env.LAB_TIMEOUT_MS || 90000);
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
// hard limit for the whole script: page load + kernel start + outputs
const HARD_LIMIT_MS = outputTimeout + 90000;

const t0 = Date.now();
function log(msg) {
  console.log(`[lab_test +${((Date.now() - t0) / 1000).toFixed(1)}s] ${msg}`);
}

async function firstCellOutput(page) {
  return page
    .locator('.jp-NotebookPanel .jp-Cell')
    .first()
    .locator('.jp-OutputArea')
    .innerText({ timeout: 2000 })
    .catch(() => '');
}

async function main() {
  if (!url) {
    console.error('LAB_URL is not set');
    return 1;
  }
  fs.mkdirSync(path.dirname(screenshot), { recursive: true });
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
    timeout: 60000,
  });
  log(`browser ${browser.version()} started`);
  let ok = false;
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    page.on('pageerror', (e) => log(`page error: ${e.message}`));
    page.on('console', (m) => {
      if (m.type() === 'error') log(`console error: ${m.text()}`);
    });
    await page.goto(url, { waitUntil: 'domcontentloaded', timeout: 60000 });
    log('page loaded');

    // the notebook's first cell editor, with the notebook's code in it
    const cell = page.locator('.jp-NotebookPanel .jp-Cell').first();
    const editor = cell.locator('.cm-content');
    await editor.waitFor({ state: 'visible', timeout: 60000 });
    await page.waitForFunction(
      () => {
        const ed = document.querySelector('.jp-NotebookPanel .jp-Cell .cm-content');
        return ed && ed.innerText.trim().length > 0;
      },
      null,
      { timeout: 30000, polling: 100 }
    );
    log(`notebook open, first cell: ${JSON.stringify(await editor.innerText())}`);

    // the kernel is up when the status bar shows "<kernel> | Idle" (not
    // "No Kernel"); a kernel-selection (or any other) dialog means trouble
    const ready = page.waitForFunction(
      () => {
        const bar = document.querySelector('#jp-main-statusbar');
        const text = bar ? bar.innerText : '';
        return /\| Idle/.test(text) && !/No Kernel/.test(text);
      },
      null,
      { timeout: 90000, polling: 250 }
    );
    const dialog = page.locator('.jp-Dialog');
    await Promise.race([
      ready,
      dialog.first().waitFor({ state: 'visible', timeout: 90000 }).then(async () => {
        throw new Error(`dialog instead of a kernel: ${await dialog.first().innerText()}`);
      }),
    ]);
    const kernelName = await page
      .locator('.jp-NotebookPanel .jp-Toolbar-kernelName')
      .first()
      .innerText()
      .catch(() => '?');
    log(`kernel idle: ${kernelName.trim()}`);

    // run the cell: focus its editor, Shift+Enter
    await editor.click();
    await page.keyboard.press('Shift+Enter');
    log('cell submitted');

    await page.waitForFunction(
      (want) => {
        const cell = document.querySelector('.jp-NotebookPanel .jp-Cell');
        const out = cell && cell.querySelector('.jp-OutputArea');
        const text = out ? out.innerText : '';
        return want.every((s) => text.includes(s));
      },
      expect,
      { timeout: outputTimeout, polling: 250 }
    );
    log('all expected outputs shown');
    // let the kernel go idle so the screenshot shows the finished cell
    await page
      .waitForFunction(
        () => /\| Idle/.test((document.querySelector('#jp-main-statusbar') || {}).innerText || ''),
        null,
        { timeout: 15000, polling: 250 }
      )
      .catch(() => log('kernel not idle 15 s after the outputs'));
    ok = true;
    log(`first cell output:\n${await firstCellOutput(page)}`);
    await page.screenshot({ path: screenshot });
    log(`screenshot: ${screenshot}`);
  } catch (e) {
    log(`FAILED: ${e.message}`);
    const pages = browser.contexts().flatMap((c) => c.pages());
    if (pages.length) {
      log(`first cell output so far:\n${await firstCellOutput(pages[0])}`);
      await pages[0].screenshot({ path: screenshot }).catch(() => {});
      log(`screenshot of the failure: ${screenshot}`);
    }
  } finally {
    await browser.close().catch(() => {});
  }
  return ok ? 0 : 1;
}

const hard = setTimeout(() => {
  log(`hard time limit (${HARD_LIMIT_MS} ms) reached`);
  process.exit(2);
}, HARD_LIMIT_MS);

main().then(
  (code) => {
    clearTimeout(hard);
    process.exit(code);
  },
  (e) => {
    console.error(e);
    clearTimeout(hard);
    process.exit(1);
  }
);
