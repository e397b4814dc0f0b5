// Shared by the playground and the dashboard: API calls (relative URLs only, so the
// pages work behind a proxy and under a path prefix) with the optional API key, which
// lives in this tab's sessionStorage and nowhere else.
"use strict";

const KEY_STORAGE = "lamina.apiKey";
let pendingKeyPrompt = null; // one dialog for all the calls that met a 401 at once

function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  const key = storedKey();
  return key ? { Authorization: "Bearer " + key } : {};
}

// Ask for a key in the page's <dialog id="key-dialog">; resolves to the key, or null
// when the person cancels.
function askForKey(message) {
  if (pendingKeyPrompt) return pendingKeyPrompt;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-message").textContent = message;
  input.value = "";
  pendingKeyPrompt = new Promise((resolve) => {
    const form = dialog.querySelector("form");
    const finish = (value) => {
      form.onsubmit = null;
      dialog.onclose = null;
      pendingKeyPrompt = null;
      if (dialog.open) dialog.close();
      resolve(value);
    };
    form.onsubmit = (event) => {
      event.preventDefault();
      finish(input.value.trim() || null);
    };
    dialog.onclose = () => finish(null);
    dialog.showModal();
    input.focus();
  });
  return pendingKeyPrompt;
}

// fetch(path) with the stored key; on a 401 it asks for a key and tries again, until
// the server accepts one or the person cancels (then the 401 response is returned).
async function apiFetch(path, options = {}) {
  for (;;) {
    const headers = Object.assign({}, options.headers || {}, authHeaders());
    const response = await fetch(path, Object.assign({}, options, { headers }));
    if (response.status !== 401) return response;
    const refused = storedKey() !== "";
    const key = await askForKey(
      refused ? "The server refused that key. Enter another one." : "This server needs an API key."
    );
    if (key === null) return response;
    sessionStorage.setItem(KEY_STORAGE, key);
  }
}

// The error message of a lamina error envelope, or the status line.
async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) {
    /* not JSON */
  }
  return "HTTP " + response.status;
}

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}
