// payload-guard console: progressive enhancement only; every page and button works without it.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // Destructive buttons ask first.
  for (const button of document.querySelectorAll("button[data-confirm]")) {
    button.addEventListener("click", (event) => {
      if (!window.confirm(button.dataset.confirm)) event.preventDefault();
    });
  }
  // Filters apply as soon as a choice is made.
  for (const select of document.querySelectorAll("select[data-autosubmit]")) {
    select.addEventListener("change", () => select.form.submit());
  }
  // Coming back to a page from the history re-enables its buttons.
  window.addEventListener("pageshow", () => {
    for (const button of document.querySelectorAll("button[aria-busy]")) {
      button.removeAttribute("aria-busy");
      button.disabled = false;
    }
  });
  // Buttons say what they are doing while the proxy works (a replay waits for the receiver).
  for (const form of document.querySelectorAll("form[method=post]")) {
    form.addEventListener("submit", () => {
      for (const button of form.querySelectorAll("button")) {
        button.setAttribute("aria-busy", "true");
        button.disabled = true;
      }
    });
  }
});
