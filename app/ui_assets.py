"""CSS and the keyboard-shortcut script of the ranking UI (passed to `launch(css=, head=)`)."""

SHORTCUTS_MD = (
    "**Keyboard:** type the letters best first and press **Enter** (`bacd` = B > A > C > D; "
    "`b a=c d` or `b(ac)d` ties A and C; the last letter may be left out) · "
    "**Alt+S** skip · **Alt+U** undo last · **Alt+X** all bad · **Alt+F** flag · "
    "**Alt+O** note · **Alt+N** next item · **Alt+R** back to the ranking box")

CSS = """
.rl-prompt { border-left: 4px solid var(--color-accent); padding: 6px 12px; margin-bottom: 4px; }
.rl-cards { display: grid; gap: 10px; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); }
.rl-k2, .rl-k4 { grid-template-columns: repeat(2, minmax(0, 1fr)); }
@media (max-width: 700px) { .rl-cards { grid-template-columns: minmax(0, 1fr); } }
.rl-card { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 10px;
           background: var(--background-fill-secondary); }
.rl-head { display: flex; justify-content: space-between; align-items: center; margin-bottom: 4px;
           font-size: 0.85em; color: var(--body-text-color-subdued); }
.rl-label { font-weight: 700; font-size: 1.25em; color: var(--body-text-color);
            background: var(--color-accent-soft); border-radius: 4px; padding: 0 10px; }
.rl-text { white-space: pre-wrap; word-break: break-word; font-family: var(--font);
           font-size: 0.95em; margin: 0; max-height: 24em; overflow: auto; }
.rl-md { font-size: 0.95em; max-height: 24em; overflow: auto; word-break: break-word; }
.rl-md p, .rl-md ul, .rl-md ol, .rl-md pre { margin: 0 0 0.5em; }
.rl-md pre, .rl-md code { font-family: var(--font-mono); background: var(--background-fill-primary);
                          border-radius: 4px; }
.rl-md pre { padding: 6px 8px; overflow-x: auto; white-space: pre; }
.rl-md ul, .rl-md ol { padding-left: 1.4em; }
.rl-md ul { list-style: disc; } .rl-md ol { list-style: decimal; }
.rl-card .rl-raw { display: none; }  /* "Show raw text" swaps them (app/guidelines.py) */
#rl-rubric .rl-rubric { font-weight: 600; font-size: 1.05em; }
#rl-rubric p { margin: 0; }
.rl-guidelines { max-height: 30em; overflow: auto; }
.rl-jobs { display: flex; flex-direction: column; gap: 4px; font-size: 0.9em; }
.rl-job { display: grid; grid-template-columns: 14em 6em 1fr 3.5em; gap: 8px; align-items: center; }
.rl-job-msg { grid-column: 1 / -1; color: var(--body-text-color-subdued); font-size: 0.85em; }
.rl-job-msg:empty { display: none; }
.rl-workers { display: flex; flex-direction: column; gap: 4px; font-size: 0.9em; }
.rl-worker { display: grid; grid-template-columns: 1fr 6em 9em 12em; gap: 8px; }
.rl-no-worker { color: #d33; }
.rl-bar { height: 10px; border-radius: 5px; background: var(--border-color-primary); overflow: hidden; }
.rl-bar > span { display: block; height: 100%; }
#rl-ranking textarea, #rl-ranking input { font-family: var(--font-mono); font-size: 1.3em;
                                          letter-spacing: 0.1em; }
#rl-ranks { gap: 6px; }
#rl-message p { margin: 0; }
#rl-header { align-items: center; }
#rl-title h3 { margin: 0; }
/* A phone (390 px): Gradio gives every child of a row an equal share, so the header's title
   and progress were 57 px columns of broken words beside a 166 px tall button. There: the
   title on a line of its own, progress and the account button below; rows of form controls
   wrap instead of squeezing; wide rows (job and worker grids, tables) fit or scroll. */
@media (max-width: 700px) {
  #rl-header { flex-wrap: wrap; gap: 2px 8px; }
  #rl-header > #rl-title { flex: 1 1 100% !important; min-width: 100% !important; }
  #rl-header > #rl-progress { flex: 1 1 0 !important; min-width: 0 !important; }
  #rl-header > #rl-account { flex: 0 0 auto !important; min-width: 0 !important;
                             height: auto !important; align-self: center; }
  #rl-title h3 { font-size: 1.05em; }
  .row:has(> #rl-dash-updated) { flex-wrap: wrap; align-items: center; }
  .row:has(> #rl-dash-updated) > * { flex: 1 1 auto !important; min-width: 0 !important; }
  .row:has(> #rl-dash-updated) > button { flex: 0 0 auto !important; height: auto !important; }
  /* Gradio wraps neighbouring form fields in one .form flex box */
  .form:has(> #rl-allbad) { flex-wrap: wrap; }
  .form:has(> #rl-allbad) > .block { flex: 1 1 40% !important; }
  .form:has(> #rl-allbad) > #rl-note { flex: 1 1 100% !important; }
  .row:has(> .form > #rl-ranking), .row:has(> .form > #rl-raw) { flex-wrap: wrap; }
  .row:has(> .form > #rl-ranking) > *, .row:has(> .form > #rl-raw) > * {
    flex: 1 1 100% !important; min-width: 100% !important; }
  .row:has(> #rl-cancel-btn) > button, .row:has(> #rl-job-algorithm) > button {
    height: auto !important; align-self: center; }
  .rl-job { grid-template-columns: minmax(0, 1fr) auto 3em;
            grid-template-areas: "name status pct" "bar bar bar" "msg msg msg"; }
  .rl-job-name { grid-area: name; } .rl-job-status { grid-area: status; }
  .rl-job .rl-bar { grid-area: bar; } .rl-pct { grid-area: pct; }
  .rl-job .rl-job-msg { grid-area: msg; }
  .rl-worker { grid-template-columns: minmax(0, 1fr) auto; }
  #rl-status table, #rs-version table.rs { display: block; overflow-x: auto; }
  #rl-status th, #rl-status td { white-space: nowrap; word-break: normal; padding: 4px 6px; }
}
"""

# Alt+<key> shortcuts: click a button, toggle a checkbox, or focus a text field by elem_id.
# e.code (not e.key) so Alt+S works on layouts where Alt changes the character (macOS).
HEAD = """
<script>
(() => {
  const MAP = {KeyS: "rl-skip", KeyU: "rl-undo", KeyN: "rl-next", KeyX: "rl-allbad",
               KeyF: "rl-flag", KeyO: "rl-note", KeyR: "rl-ranking"};
  document.addEventListener("keydown", (e) => {
    if (!e.altKey || e.ctrlKey || e.metaKey) return;
    const id = MAP[e.code];
    const el = id && document.getElementById(id);
    if (!el) return;
    e.preventDefault();
    const box = el.querySelector("input[type=checkbox]");
    if (box) { box.click(); return; }
    const field = el.querySelector("textarea, input");
    if (field) { field.focus(); return; }
    (el.tagName === "BUTTON" ? el : el.querySelector("button"))?.click();
  });
})();
</script>
"""

FOCUS_RANKING_JS = """() => {
  setTimeout(() => document.querySelector("#rl-ranking textarea, #rl-ranking input")?.focus(), 50);
}"""
