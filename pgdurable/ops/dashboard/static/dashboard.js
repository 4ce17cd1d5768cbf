// The dashboard's only script (served from this server: the Content Security Policy
// allows no other). It asks before a form marked data-confirm is sent, and reloads the
// overview every 5 seconds while its box is ticked (remembered in this browser).
"use strict";
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
document.addEventListener("DOMContentLoaded", function () {
  var box = document.getElementById("autorefresh");
  if (!box) {
    return;
  }
  box.checked = window.localStorage.getItem("pgdurable.autorefresh") === "1";
  box.addEventListener("change", function () {
    window.localStorage.setItem("pgdurable.autorefresh", box.checked ? "1" : "0");
  });
  window.setInterval(function () {
    if (box.checked) {
      window.location.reload();
    }
  }, 5000);
});
