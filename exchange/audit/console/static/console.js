// zonex console: drop a file on a drop zone to choose it for the zone's file input.
(function () {
  "use strict";
  function show(zone, input) {
    var chosen = zone.querySelector(".chosen");
    if (chosen) { chosen.textContent = input.files.length ? input.files[0].name : ""; }
  }
  function wire(zone) {
    var input = document.getElementById(zone.dataset.input);
    if (!input) { return; }
    input.addEventListener("change", function () { show(zone, input); });
    zone.addEventListener("dragover", function (event) {
      event.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", function () { zone.classList.remove("over"); });
    zone.addEventListener("drop", function (event) {
      event.preventDefault();
      zone.classList.remove("over");
      if (event.dataTransfer && event.dataTransfer.files.length) {
        input.files = event.dataTransfer.files;
        show(zone, input);
      }
    });
  }
  function init(root) {
    root.querySelectorAll(".dropzone[data-input]").forEach(wire);
  }
  document.addEventListener("DOMContentLoaded", function () { init(document); });
})();
