// Markdown → DOM nodes for model output. Safety invariant: text only ever reaches the page through
// textContent / createTextNode; no innerHTML, no attribute built from output except an http(s) href.
// Covers what chat models write: fenced code (an unclosed fence while streaming is still code),
// headings, lists, paragraphs, `code`, **bold**, *italics*, [links](https://...).
"use strict";
(function () {
  function el(tag, text) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Inline spans, left to right: the earliest match wins; the text between matches stays text.
  const INLINE = /`([^`\n]+)`|\*\*([^*\n]+)\*\*|\*([^*\n]+)\*|\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/;
  function inline(parent, text) {
    let rest = text;
    for (let m = INLINE.exec(rest); m; m = INLINE.exec(rest)) {
      if (m.index) parent.appendChild(document.createTextNode(rest.slice(0, m.index)));
      if (m[1] !== undefined) parent.appendChild(el("code", m[1]));
      else if (m[2] !== undefined) parent.appendChild(el("strong", m[2]));
      else if (m[3] !== undefined) parent.appendChild(el("em", m[3]));
      else {
        const a = el("a", m[4]);
        a.href = m[5]; // only http(s) reaches here (the pattern), never javascript:
        a.target = "_blank";
        a.rel = "noopener noreferrer";
        parent.appendChild(a);
      }
      rest = rest.slice(m.index + m[0].length);
    }
    if (rest) parent.appendChild(document.createTextNode(rest));
    return parent;
  }

  function render(text) {
    const root = document.createDocumentFragment();
    const lines = text.split("\n");
    let para = [];
    let list = null;
    const flush = () => {
      if (para.length) root.appendChild(inline(el("p"), para.join("\n")));
      para = [];
      list = null;
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = /^\s*```\s*([\w+#.-]*)/.exec(line);
      if (fence) {
        flush();
        const body = [];
        for (i++; i < lines.length && !/^\s*```/.test(lines[i]); i++) body.push(lines[i]);
        const pre = el("pre");
        const code = el("code", body.join("\n"));
        if (fence[1]) code.dataset.lang = fence[1];
        pre.appendChild(code);
        root.appendChild(pre);
        continue;
      }
      const heading = /^(#{1,4})\s+(.*)$/.exec(line);
      const item = /^\s*(?:[-*+]|(\d+)[.)])\s+(.*)$/.exec(line);
      if (heading) {
        flush();
        root.appendChild(inline(el("h" + (heading[1].length + 2)), heading[2]));
      } else if (item) {
        if (para.length) { root.appendChild(inline(el("p"), para.join("\n"))); para = []; }
        const tag = item[1] ? "ol" : "ul";
        if (!list || list.tagName.toLowerCase() !== tag) { list = el(tag); root.appendChild(list); }
        list.appendChild(inline(el("li"), item[2]));
      } else if (!line.trim()) {
        flush();
      } else {
        list = null;
        para.push(line);
      }
    }
    flush();
    return root;
  }

  window.kilnMarkdown = { render: render };
})();
